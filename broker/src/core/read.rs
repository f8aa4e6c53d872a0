//! Reads the core shares between its operations: a partition's messages
//! (on a blocking thread), the long-poll wait for appends, a group's
//! starting position, fetch limits clamped to the configured maxima.

use super::{blocking, from_write, invalid, BrokerState};
use crate::command::Command;
use crate::storage::read;
use crate::topics::Topic;
use msmq_protocol::{ErrorReply, FetchLimits, Message, StartFrom, TopicPartition};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Limits clamped to the broker's configured maxima.
pub(crate) struct Clamped {
    pub max_messages: usize,
    pub max_bytes: usize,
    pub wait: Duration,
}

pub(crate) fn clamp(state: &BrokerState, limits: FetchLimits) -> Result<Clamped, ErrorReply> {
    if limits.max_messages == 0 || limits.max_bytes == 0 {
        return Err(invalid("max_messages and max_bytes must be at least 1"));
    }
    let c = &state.config;
    Ok(Clamped {
        max_messages: limits.max_messages.min(c.fetch_messages_max) as usize,
        max_bytes: (limits.max_bytes as u64).min(c.fetch_bytes_max.as_u64()) as usize,
        wait: Duration::from_millis(limits.max_wait_ms as u64).min(c.fetch_wait_max),
    })
}

/// Read `from..end` of a partition on a blocking thread.
pub(crate) async fn read_messages(
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
pub(crate) async fn wait_for_append(
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

/// A live topic by its id.
pub(crate) fn topic_by_id(state: &BrokerState, topic_id: u32) -> Option<Arc<Topic>> {
    state
        .registry
        .list()
        .into_iter()
        .find(|t| t.id() == topic_id)
}

/// The message at `offset`, if the log still has it.
pub(crate) async fn message_at(
    state: &BrokerState,
    topic: &Topic,
    partition: u32,
    offset: u64,
) -> Result<Option<Message>, ErrorReply> {
    let found = read_messages(state, topic, partition, offset, 1, usize::MAX).await?;
    Ok(found.into_iter().next().filter(|m| m.offset == offset))
}

/// Where a partition the group has no read position for starts.
pub(crate) async fn initial_position(
    state: &BrokerState,
    group: &str,
    tp: &TopicPartition,
    start: StartFrom,
) -> Result<Option<u64>, ErrorReply> {
    let Some(topic) = state.registry.get(&tp.topic) else {
        return Ok(None);
    };
    let Some(offsets) = topic.partition(tp.partition) else {
        return Ok(None);
    };
    let db = state.store.db().clone();
    let (g, id, p) = (group.to_string(), topic.id(), tp.partition);
    let committed = blocking(move || read::group_offset(&db, &g, id, p)).await?;
    let position = match (committed, start) {
        (Some(c), _) => c,
        (None, StartFrom::Earliest) => offsets.start(),
        (None, StartFrom::Latest) => {
            // Joining pinned every partition the topic had then; this one is
            // newer. Pin it where the group has no position yet (a member
            // may have committed meanwhile) and read back what is stored.
            state
                .submit(Command::PinOffsets {
                    group: group.to_string(),
                    offsets: vec![(id, p, offsets.end())],
                })
                .await
                .map_err(from_write)?;
            let db = state.store.db().clone();
            let g = group.to_string();
            blocking(move || read::group_offset(&db, &g, id, p))
                .await?
                .unwrap_or_else(|| offsets.end())
        }
    };
    Ok(Some(position.clamp(offsets.start(), offsets.end())))
}
