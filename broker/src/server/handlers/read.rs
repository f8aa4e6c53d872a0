//! Direct reads by partition and offset, and the long-poll wait shared with
//! group polls.

use super::{blocking, unknown_topic};
use crate::server::BrokerState;
use crate::storage::read;
use crate::topics::Topic;
use msmq_protocol::{
    ErrorCode, ErrorReply, FetchLimits, FetchedMessages, FoundMessage, Message, MessageId, Reply,
};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Limits clamped to the broker's configured maxima.
pub(super) struct Clamped {
    pub max_messages: usize,
    pub max_bytes: usize,
    pub wait: Duration,
}

pub(super) fn clamp(state: &BrokerState, limits: FetchLimits) -> Result<Clamped, ErrorReply> {
    if limits.max_messages == 0 || limits.max_bytes == 0 {
        return Err(super::invalid(
            "max_messages and max_bytes must be at least 1",
        ));
    }
    let c = &state.config;
    Ok(Clamped {
        max_messages: limits.max_messages.min(c.fetch_messages_max) as usize,
        max_bytes: (limits.max_bytes as u64).min(c.fetch_bytes_max.as_u64()) as usize,
        wait: Duration::from_millis(limits.max_wait_ms as u64).min(c.fetch_wait_max),
    })
}

/// Read `from..end` of a partition on a blocking thread.
pub(super) async fn read_messages(
    state: &BrokerState,
    topic: &Topic,
    partition: u32,
    from: u64,
    max_messages: usize,
    max_bytes: usize,
) -> Result<Vec<Message>, ErrorReply> {
    // The topic may have been re-created with fewer partitions since the
    // caller looked: a missing partition simply has nothing to read.
    let Some(offsets) = topic.partition(partition) else {
        return Ok(Vec::new());
    };
    let end = offsets.end();
    if from >= end {
        return Ok(Vec::new());
    }
    let db = state.store.db().clone();
    let segments = state.store.segments().clone();
    let (store_id, topic_id) = (state.store.store_id(), topic.id());
    blocking(move || {
        read::read_partition(
            &db,
            &segments,
            store_id,
            topic_id,
            partition,
            from,
            end,
            max_messages,
            max_bytes,
        )
    })
    .await
}

/// Wait until messages are appended anywhere or `deadline` passes. Returns
/// false on timeout or shutdown. Call with a receiver taken *before* the
/// check that found nothing, so no append slips between check and wait.
pub(super) async fn wait_for_append(
    state: &BrokerState,
    appended: &mut tokio::sync::watch::Receiver<u64>,
    deadline: Instant,
) -> bool {
    if state.is_shutting_down() {
        return false;
    }
    matches!(
        tokio::time::timeout_at(deadline, appended.changed()).await,
        Ok(Ok(()))
    )
}

pub(super) async fn fetch(
    state: &BrokerState,
    topic_name: String,
    partition: u32,
    offset: u64,
    limits: FetchLimits,
) -> Result<Reply, ErrorReply> {
    let topic: Arc<Topic> = state
        .registry
        .get(&topic_name)
        .ok_or_else(|| unknown_topic(&topic_name))?;
    let offsets = topic.partition(partition).ok_or_else(|| {
        ErrorReply::new(
            ErrorCode::UNKNOWN_PARTITION,
            format!(
                "topic {topic_name:?} has partitions 0..{}, not {partition}",
                topic.partition_count()
            ),
        )
    })?;
    let limits = clamp(state, limits)?;
    let (start, end) = (offsets.start(), offsets.end());
    if offset < start || offset > end {
        return Err(ErrorReply::new(
            ErrorCode::OFFSET_OUT_OF_RANGE,
            format!("offset {offset} is outside partition {partition}'s log {start}..{end}"),
        ));
    }
    let deadline = Instant::now() + limits.wait;
    let mut appended = state.registry.subscribe_appended();
    loop {
        appended.borrow_and_update();
        let messages = read_messages(
            state,
            &topic,
            partition,
            offset,
            limits.max_messages,
            limits.max_bytes,
        )
        .await?;
        if !messages.is_empty() || !wait_for_append(state, &mut appended, deadline).await {
            return Ok(Reply::Fetched(FetchedMessages {
                topic: topic_name,
                partition,
                end_offset: offsets.end(),
                next_offset: messages.last().map_or(offset, |m| m.offset + 1),
                messages,
            }));
        }
    }
}

/// Most messages one `FindMessages` returns.
pub const FIND_MESSAGES_MAX: u32 = 1000;

/// A live topic by its id.
pub(super) fn topic_by_id(state: &BrokerState, topic_id: u32) -> Option<Arc<Topic>> {
    state
        .registry
        .list()
        .into_iter()
        .find(|t| t.id() == topic_id)
}

/// The message at `offset`, if the log still has it.
pub(super) async fn message_at(
    state: &BrokerState,
    topic: &Topic,
    partition: u32,
    offset: u64,
) -> Result<Option<Message>, ErrorReply> {
    let found = read_messages(state, topic, partition, offset, 1, usize::MAX).await?;
    Ok(found.into_iter().next().filter(|m| m.offset == offset))
}

pub(super) async fn get_message(state: &BrokerState, id: MessageId) -> Result<Reply, ErrorReply> {
    if id.store_id() != state.store.store_id() {
        return Ok(Reply::Messages(Vec::new()));
    }
    let db = state.store.db().clone();
    let sequence = id.sequence();
    let Some((topic_id, partition, offset)) =
        blocking(move || read::locate_by_sequence(&db, sequence)).await?
    else {
        return Ok(Reply::Messages(Vec::new()));
    };
    let Some(topic) = topic_by_id(state, topic_id) else {
        return Ok(Reply::Messages(Vec::new()));
    };
    let found = message_at(state, &topic, partition, offset).await?;
    Ok(Reply::Messages(
        found
            .filter(|m| m.id == id)
            .map(|message| FoundMessage {
                topic: topic.name.clone(),
                partition,
                message,
            })
            .into_iter()
            .collect(),
    ))
}

pub(super) async fn find_messages(
    state: &BrokerState,
    topic_name: String,
    key: Vec<u8>,
    limit: u32,
) -> Result<Reply, ErrorReply> {
    let topic = state
        .registry
        .get(&topic_name)
        .ok_or_else(|| unknown_topic(&topic_name))?;
    let limit = limit.clamp(1, FIND_MESSAGES_MAX) as usize;
    let db = state.store.db().clone();
    let (topic_id, hash) = (topic.id(), crate::storage::key_hash(&key));
    // Hash collisions are possible: read more candidates than asked, keep exact keys.
    let candidates =
        blocking(move || read::locate_by_key_hash(&db, topic_id, hash, limit * 2)).await?;
    let mut out = Vec::new();
    for (partition, offset) in candidates {
        if let Some(message) = message_at(state, &topic, partition, offset).await? {
            if message.key.as_deref().map(|k| &k[..]) == Some(&key[..]) {
                out.push(FoundMessage {
                    topic: topic_name.clone(),
                    partition,
                    message,
                });
                if out.len() >= limit {
                    break;
                }
            }
        }
    }
    Ok(Reply::Messages(out))
}
