//! Per-message acknowledgement: receive with a lease, ack, nack, change
//! invisibility, retries with back-off and dead letters. The decisions are
//! in `crate::delivery`; this applies them to the core's state and storage.
//! The wire's dispatch and the plugin runner (dead letters) both call here.
//!
//! Layout: this file holds the group's ack state, its dead-letter topic and
//! start-up loading; `receive.rs` hands messages out under a lease,
//! `settle.rs` acks, nacks, expires and commits floors.
//!
//! Invariant: a message's retry record or dead letter is durable before its
//! lease is settled in memory, so the floor the group commits never passes
//! a message that is neither acked, nor scheduled for retry, nor dead-lettered.

mod receive;
mod settle;

pub(crate) use receive::receive;
pub(crate) use settle::{ack, change_invisibility, configure, expire_leases, nack};

use super::read::{
    clamp, initial_position, message_at, read_messages, topic_by_id, wait_for_append,
};
use super::{blocking, from_write, invalid, unknown_topic};
use crate::command::{Command, TopicRef};
use crate::core::BrokerState;
use crate::delivery::{
    AckRegistry, AfterFailure, GroupAcks, Lease, PartitionLeases, RetryPolicy, RetryRecord,
    INVISIBILITY_MS_MAX, INVISIBILITY_MS_MIN, UNSETTLED_PER_PARTITION_MAX,
};
use crate::storage::{read, Store, WriteError};
use crate::topics::Topic;
use msmq_protocol::{
    names::validate_name, ErrorCode, ErrorReply, FetchLimits, Header, LeasedBatch, LeasedMessage,
    Message, NewMessage, Receipt, Reply,
};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Prefix of a group's dead-letter topic: `%DLQ%<group>`.
pub const DLQ_PREFIX: &str = "%DLQ%";
/// How often expired leases are looked for.
const LEASE_SWEEP_MS: u64 = 50;
/// Most expired leases handled per sweep.
const EXPIRED_PER_SWEEP_MAX: usize = 10_000;

/// Header names a dead letter carries.
pub mod dlq_headers {
    pub const REASON: &str = "msmq.dlq.reason";
    pub const TOPIC: &str = "msmq.dlq.topic";
    pub const PARTITION: &str = "msmq.dlq.partition";
    pub const OFFSET: &str = "msmq.dlq.offset";
    pub const ID: &str = "msmq.dlq.id";
    pub const ATTEMPTS: &str = "msmq.dlq.attempts";
}

/// A dead letter: the message as it was, with headers saying where it came
/// from and why it was given up.
pub(crate) fn dead_letter(
    m: msmq_protocol::Message,
    reason: &str,
    topic: &str,
    partition: u32,
    attempts: u32,
) -> NewMessage {
    let mut letter = NewMessage {
        payload: m.payload,
        key: m.key,
        tag: m.tag,
        headers: m.headers,
        deliver_at_ms: None,
    };
    for (name, value) in [
        (dlq_headers::REASON, reason.to_string()),
        (dlq_headers::TOPIC, topic.to_string()),
        (dlq_headers::PARTITION, partition.to_string()),
        (dlq_headers::OFFSET, m.offset.to_string()),
        (dlq_headers::ID, m.id.to_string()),
        (dlq_headers::ATTEMPTS, attempts.to_string()),
    ] {
        letter.headers.push(Header {
            name: name.to_string(),
            value,
        });
    }
    letter
}

/// Whether `group` consumes with per-message acks (then offset commits and
/// polls would undo its floor).
pub(crate) fn uses_acks(state: &BrokerState, group: &str) -> bool {
    acks(state)
        .groups
        .get(group)
        .is_some_and(|g| !g.partitions.is_empty() || !g.retries.is_empty())
}

/// Forget a deleted topic's leases and retries in every group.
pub(crate) fn forget_topic(state: &BrokerState, topic_id: u32) {
    let mut reg = acks(state);
    for g in reg.groups.values_mut() {
        g.partitions.retain(|k, _| k.0 != topic_id);
        g.retries.remove_topic(topic_id);
    }
}

/// Before a group's offsets on a topic are reset: refuse while messages are
/// leased; otherwise drop its in-memory state and stored retries for the
/// topic, so the next receive starts from the new offsets.
pub(crate) async fn prepare_reset(
    state: &BrokerState,
    group: &str,
    topic_id: u32,
) -> Result<(), ErrorReply> {
    let dropped = {
        let mut reg = acks(state);
        let Some(g) = reg.groups.get_mut(group) else {
            return Ok(());
        };
        let leased: usize = g
            .partitions
            .iter()
            .filter(|(k, _)| k.0 == topic_id)
            .map(|(_, p)| p.in_flight())
            .sum();
        if leased > 0 {
            return Err(ErrorReply::new(
                ErrorCode::GROUP_ACTIVE,
                format!("group {group:?} still has {leased} messages leased; wait for their invisibility to end"),
            ));
        }
        g.partitions.retain(|k, _| k.0 != topic_id);
        g.retries.remove_topic(topic_id)
    };
    if !dropped.is_empty() {
        let op = Command::Settle {
            group: group.to_string(),
            retry_puts: vec![],
            retry_deletes: dropped,
            dead_letters: vec![],
            now_ms: state.now_ms(),
        };
        state.submit(op).await.map_err(from_write)?;
    }
    Ok(())
}

/// Retries and policies from storage, at start-up.
pub(crate) async fn load_acks(store: &Store) -> anyhow::Result<AckRegistry> {
    let db = store.db().clone();
    let retries = tokio::task::spawn_blocking(move || read::all_retries(&db)).await??;
    let mut registry = AckRegistry::default();
    for (group, key, record) in retries {
        registry
            .groups
            .entry(group)
            .or_default()
            .retries
            .insert(key, record);
    }
    let groups: Vec<String> = registry.groups.keys().cloned().collect();
    for group in groups {
        let db = store.db().clone();
        let g = group.clone();
        if let Some(policy) =
            tokio::task::spawn_blocking(move || read::group_policy(&db, &g)).await??
        {
            registry
                .groups
                .get_mut(&group)
                .expect("just inserted")
                .policy = policy;
        }
    }
    Ok(registry)
}

fn acks(state: &BrokerState) -> std::sync::MutexGuard<'_, AckRegistry> {
    state.acks.lock().expect("ack lock")
}

/// Make sure the group's ack state exists (with its stored policy).
async fn ensure_group(state: &BrokerState, group: &str) -> Result<(), ErrorReply> {
    if acks(state).groups.contains_key(group) {
        return Ok(());
    }
    let db = state.store.db().clone();
    let g = group.to_string();
    let policy = blocking(move || read::group_policy(&db, &g))
        .await?
        .unwrap_or_default();
    acks(state)
        .groups
        .entry(group.to_string())
        .or_insert_with(|| GroupAcks {
            policy,
            ..GroupAcks::default()
        });
    Ok(())
}

fn stale_or_missing(group: &str) -> ErrorReply {
    ErrorReply::new(
        ErrorCode::UNKNOWN_GROUP,
        format!("group {group:?} has received nothing with per-message acks"),
    )
}

/// The group's dead-letter topic, created on first use.
pub(crate) async fn dlq_topic(state: &BrokerState, group: &str) -> Result<Arc<Topic>, ErrorReply> {
    let name = format!("{DLQ_PREFIX}{group}");
    if let Some(t) = state.registry.get(&name) {
        return Ok(t);
    }
    match state
        .submit(Command::CreateTopic {
            name: name.clone(),
            partitions: 1,
            created_at_ms: state.now_ms(),
        })
        .await
    {
        Ok(_) | Err(WriteError::TopicExists(_)) => {}
        Err(e) => return Err(from_write(e)),
    }
    state
        .registry
        .get(&name)
        .ok_or_else(|| unknown_topic(&name))
}
