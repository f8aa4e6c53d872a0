//! Direct reads by partition and offset, and the long-poll wait shared with
//! group polls.

use crate::core::read::{clamp, message_at, read_messages, topic_by_id, wait_for_append};
use crate::core::BrokerState;
use crate::core::{blocking, unknown_topic};
use crate::storage::read;
use crate::topics::Topic;
use msmq_protocol::{
    ErrorCode, ErrorReply, FetchLimits, FetchedMessages, FoundMessage, MessageId, Reply,
};
use std::sync::Arc;
use tokio::time::Instant;

pub(crate) async fn fetch(
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

pub(crate) async fn get_message(state: &BrokerState, id: MessageId) -> Result<Reply, ErrorReply> {
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

pub(crate) async fn find_messages(
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
