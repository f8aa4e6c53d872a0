//! Per-message acknowledgement: receive with a lease, ack, nack, change
//! invisibility, retries with back-off and dead letters. The decisions are
//! in `crate::delivery`; this applies them to the core's state and storage.
//! The wire's dispatch and the plugin runner (dead letters) both call here.
//!
//! Size: over 800 lines; it is split into receive and settle when the
//! deterministic-core work reaches acks.
//!
//! Invariant: a message's retry record or dead letter is durable before its
//! lease is settled in memory, so the floor the group commits never passes
//! a message that is neither acked, nor scheduled for retry, nor dead-lettered.

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

pub(crate) async fn receive(
    state: &BrokerState,
    group: String,
    member_id: u64,
    limits: FetchLimits,
    invisibility_ms: u32,
) -> Result<Reply, ErrorReply> {
    if !(INVISIBILITY_MS_MIN..=INVISIBILITY_MS_MAX).contains(&invisibility_ms) {
        return Err(invalid(format!(
            "invisibility must be {INVISIBILITY_MS_MIN}..={INVISIBILITY_MS_MAX} ms, not {invisibility_ms}"
        )));
    }
    let limits = clamp(state, limits)?;
    validate_name("group", &group).map_err(invalid)?;
    // Members only: no state is created for groups nobody joined.
    state
        .with_groups(|g, _| g.heartbeat(&group, member_id, Instant::now()))
        .map_err(crate::core::from_group)?;
    ensure_group(state, &group).await?;
    let deadline = tokio::time::Instant::now() + limits.wait;
    let mut appended = state.registry.subscribe_appended();
    loop {
        appended.borrow_and_update();
        let plan = state
            .with_groups(|g, _| g.poll_targets(&group, member_id, Instant::now()))
            .map_err(crate::core::from_group)?;
        let (assignment, targets, session_timeout, filter) = (
            plan.assignment,
            plan.targets,
            plan.session_timeout,
            plan.filter,
        );
        let mut filtered_floors = BTreeMap::new();
        let mut skipped_by_filter = false;
        let now = state.now_ms();
        let until = now + invisibility_ms as u64;
        let mut out = Handouts {
            batches: Vec::new(),
            left: limits.max_messages,
            bytes_left: limits.max_bytes,
        };
        for target in targets {
            if out.full() {
                break;
            }
            let tp = &target.partition;
            let Some(topic) = state.registry.get(&tp.topic) else {
                continue;
            };
            let key = (topic.id(), tp.partition);
            let known = acks(state)
                .groups
                .get(&group)
                .is_some_and(|g| g.partitions.contains_key(&key));
            if !known {
                let Some(floor) = initial_position(state, &group, tp, target.start).await? else {
                    continue;
                };
                let (retried, ordered) = acks(state)
                    .groups
                    .get(&group)
                    .map(|g| (g.retries.offsets_of(key.0, key.1), g.policy.ordered))
                    .unwrap_or_default();
                // Ordered groups: a message waiting for its retry keeps its key
                // across restarts, so later messages of the key wait too.
                let mut retry_keys = Vec::new();
                if ordered {
                    for offset in &retried {
                        if let Some(k) = message_at(state, &topic, key.1, *offset)
                            .await?
                            .and_then(|m| m.key)
                        {
                            retry_keys.push((*offset, crate::storage::key_hash(&k)));
                        }
                    }
                }
                if let Some(g) = acks(state).groups.get_mut(&group) {
                    g.partitions.entry(key).or_insert_with(|| {
                        // Stored retries above the floor are settled already.
                        let mut leases = PartitionLeases::new(floor);
                        for offset in retried {
                            leases.settled_by_retry(offset);
                        }
                        for (offset, key_hash) in retry_keys {
                            leases.claim_key(key_hash, offset);
                        }
                        leases
                    });
                }
            }
            // Retries that are due come first.
            let due = acks(state)
                .groups
                .get(&group)
                .map(|g| g.retries.due(key.0, key.1, now, out.left))
                .unwrap_or_default();
            for (offset, record) in due {
                let nonce = {
                    let mut reg = acks(state);
                    let nonce = reg.next_nonce();
                    let Some(g) = reg.groups.get_mut(&group) else {
                        continue;
                    };
                    let Some(p) = g.partitions.get_mut(&key) else {
                        continue;
                    };
                    if p.lease_of(offset).is_some() {
                        continue;
                    }
                    // Re-check under the lock: another receive may have taken
                    // (and settled or rescheduled) it since `due` was read.
                    match g.retries.get((key.0, key.1, offset)) {
                        Some(current) if current.due_ms <= now && *current == record => {}
                        _ => continue,
                    }
                    g.retries.remove((key.0, key.1, offset));
                    p.lease(offset, record.attempt, until, nonce, true);
                    nonce
                };
                // Durable: after a crash it is visible again once the lease ends.
                let leased = RetryRecord {
                    due_ms: until,
                    ..record.clone()
                };
                let message = message_at(state, &topic, key.1, offset).await?;
                let op = Command::Settle {
                    group: group.clone(),
                    retry_puts: if message.is_some() {
                        vec![((key.0, key.1, offset), leased)]
                    } else {
                        vec![]
                    },
                    retry_deletes: if message.is_none() {
                        vec![(key.0, key.1, offset)]
                    } else {
                        vec![]
                    },
                    dead_letters: vec![],
                    now_ms: now,
                };
                let written = state.submit(op).await;
                let Some(message) = message.filter(|_| written.is_ok()) else {
                    // Gone from the log (or not recorded): forget it, or put it back.
                    let mut reg = acks(state);
                    if let Some(g) = reg.groups.get_mut(&group) {
                        if let Some(p) = g.partitions.get_mut(&key) {
                            p.settle(offset);
                        }
                        if written.is_err() {
                            g.retries.insert((key.0, key.1, offset), record);
                        }
                    }
                    continue;
                };
                out.push(
                    &tp.topic,
                    key,
                    Handout {
                        offset,
                        nonce,
                        attempt: record.attempt,
                        until,
                    },
                    message,
                );
            }
            if out.full() {
                break;
            }
            // Ordered mode: messages held back for their key, whose key is free now.
            let ordered = acks(state)
                .groups
                .get(&group)
                .is_some_and(|g| g.policy.ordered);
            let held = acks(state)
                .groups
                .get(&group)
                .and_then(|g| g.partitions.get(&key))
                .is_some_and(|p| p.has_held());
            if ordered || held {
                let ready: Vec<(u64, u64)> = {
                    let mut reg = acks(state);
                    let Some(p) = reg
                        .groups
                        .get_mut(&group)
                        .and_then(|g| g.partitions.get_mut(&key))
                    else {
                        continue;
                    };
                    // No longer ordered: what was held goes out now.
                    let ready = if ordered {
                        p.take_ready(out.left)
                    } else {
                        p.take_all_held(out.left)
                    };
                    let nonces: Vec<u64> = ready.iter().map(|_| reg.next_nonce()).collect();
                    let Some(p) = reg
                        .groups
                        .get_mut(&group)
                        .and_then(|g| g.partitions.get_mut(&key))
                    else {
                        continue;
                    };
                    ready
                        .into_iter()
                        .zip(nonces)
                        .map(|((offset, key_hash), nonce)| {
                            if ordered {
                                p.claim_key(key_hash, offset);
                            }
                            p.lease(offset, 1, until, nonce, false);
                            (offset, nonce)
                        })
                        .collect()
                };
                for (offset, nonce) in ready {
                    match message_at(state, &topic, key.1, offset).await? {
                        Some(message) => {
                            out.push(
                                &tp.topic,
                                key,
                                Handout {
                                    offset,
                                    nonce,
                                    attempt: 1,
                                    until,
                                },
                                message,
                            );
                        }
                        None => {
                            // Gone from the log: nothing to deliver or wait for.
                            let mut reg = acks(state);
                            if let Some(p) = reg
                                .groups
                                .get_mut(&group)
                                .and_then(|g| g.partitions.get_mut(&key))
                            {
                                p.settle(offset);
                                p.release_key(offset);
                            }
                        }
                    }
                }
                if out.full() {
                    break;
                }
            }
            // Then new messages from the log, while the partition has room.
            let Some((from, room)) = acks(state)
                .groups
                .get(&group)
                .and_then(|g| g.partitions.get(&key))
                .map(|p| (p.next, p.room(UNSETTLED_PER_PARTITION_MAX)))
            else {
                continue;
            };
            if room == 0 {
                continue;
            }
            let messages = read_messages(
                state,
                &topic,
                key.1,
                from,
                out.left.min(room),
                out.bytes_left,
            )
            .await?;
            let mut reg = acks(state);
            for message in messages {
                let nonce = reg.next_nonce();
                let Some(p) = reg
                    .groups
                    .get_mut(&group)
                    .and_then(|g| g.partitions.get_mut(&key))
                else {
                    break;
                };
                // Another receive of this group took it meanwhile.
                if message.offset < p.next || p.lease_of(message.offset).is_some() {
                    continue;
                }
                // A stored retry owns it (after a restart): not a fresh message.
                if p.skip_settled(message.offset) {
                    continue;
                }
                // Left out by the member's filter: settled without delivery.
                if !filter.matches(&message) {
                    skipped_by_filter = true;
                    p.lease(message.offset, 1, until, nonce, false);
                    if let Some(floor) = p.settle(message.offset) {
                        filtered_floors.insert(key, floor);
                    }
                    continue;
                }
                // Ordered mode: a key's next message waits for the previous one.
                if ordered {
                    if let Some(k) = &message.key {
                        let key_hash = crate::storage::key_hash(k);
                        if !p.claim_key(key_hash, message.offset) {
                            p.hold(message.offset, key_hash);
                            continue;
                        }
                    }
                }
                p.lease(message.offset, 1, until, nonce, false);
                out.push(
                    &tp.topic,
                    key,
                    Handout {
                        offset: message.offset,
                        nonce,
                        attempt: 1,
                        until,
                    },
                    message,
                );
            }
        }
        let filtered_any = !filtered_floors.is_empty() || skipped_by_filter;
        commit_floors(state, &group, std::mem::take(&mut filtered_floors)).await;
        if out.batches.is_empty() && filtered_any && tokio::time::Instant::now() < deadline {
            continue; // everything read was filtered out: read on at once
        }
        // Retries fall due without an append: look again at least every 100 ms then.
        let retries_waiting = acks(state)
            .groups
            .get(&group)
            .is_some_and(|g| !g.retries.is_empty());
        let mut wake = deadline.min(tokio::time::Instant::now() + session_timeout / 2);
        if retries_waiting {
            wake = wake.min(tokio::time::Instant::now() + Duration::from_millis(100));
        }
        let done = !out.batches.is_empty()
            || (!wait_for_append(state, &mut appended, wake).await
                && (state.is_shutting_down() || tokio::time::Instant::now() >= deadline));
        if done {
            return Ok(Reply::Received {
                assignment,
                batches: out.batches,
            });
        }
    }
}

/// One lease being handed out in a reply.
struct Handout {
    offset: u64,
    nonce: u64,
    attempt: u32,
    until: u64,
}

/// The reply being built: leased messages grouped by partition, and what
/// is left of the request's message and byte budget.
struct Handouts {
    batches: Vec<LeasedBatch>,
    left: usize,
    bytes_left: usize,
}

impl Handouts {
    fn full(&self) -> bool {
        self.left == 0 || self.bytes_left == 0
    }

    /// Add a leased message, charging it to the budget.
    fn push(
        &mut self,
        topic: &str,
        (topic_id, partition): (u32, u32),
        lease: Handout,
        message: Message,
    ) {
        self.left = self.left.saturating_sub(1);
        self.bytes_left = self.bytes_left.saturating_sub(message.payload.len());
        let leased = LeasedMessage {
            attempt: lease.attempt,
            receipt: Receipt {
                topic_id,
                partition,
                offset: lease.offset,
                nonce: lease.nonce,
            },
            invisible_until_ms: lease.until,
            message,
        };
        match self.batches.last_mut() {
            Some(b) if b.partition == partition && b.topic == topic => b.messages.push(leased),
            _ => self.batches.push(LeasedBatch {
                topic: topic.to_string(),
                partition,
                messages: vec![leased],
            }),
        }
    }
}

/// Store floors that moved (the group's committed offsets).
async fn commit_floors(state: &BrokerState, group: &str, floors: BTreeMap<(u32, u32), u64>) {
    if floors.is_empty() {
        return;
    }
    let op = Command::CommitOffsets {
        group: group.to_string(),
        offsets: floors.into_iter().map(|((t, p), o)| (t, p, o)).collect(),
    };
    // A floor lower than the truth only means redelivery after a crash.
    if let Err(e) = state.submit(op).await {
        tracing::warn!(%group, error = %e, "could not store the acknowledged floor");
    }
}

pub(crate) async fn ack(
    state: &BrokerState,
    group: String,
    receipts: Vec<Receipt>,
) -> Result<Reply, ErrorReply> {
    let mut settled = vec![false; receipts.len()];
    let mut floors = BTreeMap::new();
    let mut retry_acks = Vec::new();
    {
        let mut reg = acks(state);
        let g = reg
            .groups
            .get_mut(&group)
            .ok_or_else(|| stale_or_missing(&group))?;
        for (i, r) in receipts.iter().enumerate() {
            let key = (r.topic_id, r.partition);
            let Some(p) = g.partitions.get_mut(&key) else {
                continue;
            };
            let Some(lease) = p.current(r) else { continue };
            if lease.retry {
                p.mark_settling(r.offset, true);
                retry_acks.push((i, (r.topic_id, r.partition, r.offset)));
            } else {
                if let Some(floor) = p.settle(r.offset) {
                    floors.insert(key, floor);
                }
                p.release_key(r.offset);
                settled[i] = true;
            }
        }
    }
    if !retry_acks.is_empty() {
        let op = Command::Settle {
            group: group.clone(),
            retry_puts: vec![],
            retry_deletes: retry_acks.iter().map(|(_, k)| *k).collect(),
            dead_letters: vec![],
            now_ms: state.now_ms(),
        };
        let ok = state.submit(op).await.is_ok();
        let mut reg = acks(state);
        if let Some(g) = reg.groups.get_mut(&group) {
            for (i, k) in retry_acks {
                if let Some(p) = g.partitions.get_mut(&(k.0, k.1)) {
                    if ok {
                        p.settle(k.2);
                        p.release_key(k.2);
                        settled[i] = true;
                    } else {
                        p.mark_settling(k.2, false);
                    }
                }
            }
        }
    }
    commit_floors(state, &group, floors).await;
    Ok(Reply::Settled(settled))
}

pub(crate) async fn nack(
    state: &BrokerState,
    group: String,
    receipts: Vec<Receipt>,
    reason: String,
) -> Result<Reply, ErrorReply> {
    let mut settled = Vec::with_capacity(receipts.len());
    for r in receipts {
        let lease = {
            let mut reg = acks(state);
            let g = reg
                .groups
                .get_mut(&group)
                .ok_or_else(|| stale_or_missing(&group))?;
            let lease = g
                .partitions
                .get_mut(&(r.topic_id, r.partition))
                .and_then(|p| {
                    let lease = p.current(&r);
                    if lease.is_some() {
                        p.mark_settling(r.offset, true);
                    }
                    lease
                });
            lease
        };
        match lease {
            Some(lease) => {
                let reason = if reason.is_empty() {
                    "negatively acknowledged".to_string()
                } else {
                    reason.clone()
                };
                settled.push(
                    fail(
                        state,
                        &group,
                        (r.topic_id, r.partition, r.offset),
                        lease,
                        reason,
                    )
                    .await,
                );
            }
            None => settled.push(false),
        }
    }
    Ok(Reply::Settled(settled))
}

/// A delivery failed (nack or lease expiry): schedule the retry, or
/// dead-letter after the last attempt. The lease must be marked settling.
async fn fail(
    state: &BrokerState,
    group: &str,
    key: (u32, u32, u64),
    lease: Lease,
    reason: String,
) -> bool {
    let now = state.now_ms();
    let policy = acks(state)
        .groups
        .get(group)
        .map(|g| g.policy.clone())
        .unwrap_or_default();
    let after = policy.after_failure(lease.attempt, now);
    let outcome: Result<Option<RetryRecord>, String> = async {
        match after {
            AfterFailure::RetryAt(due_ms) => {
                let record = RetryRecord {
                    attempt: lease.attempt + 1,
                    due_ms,
                    reason: reason.clone(),
                };
                state
                    .submit(Command::Settle {
                        group: group.to_string(),
                        retry_puts: vec![(key, record.clone())],
                        retry_deletes: vec![],
                        dead_letters: vec![],
                        now_ms: now,
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                crate::metrics::global().retries.inc();
                Ok(Some(record))
            }
            AfterFailure::DeadLetter => {
                let topic = topic_by_id(state, key.0);
                let message = match &topic {
                    Some(t) => message_at(state, t, key.1, key.2)
                        .await
                        .map_err(|e| e.to_string())?,
                    None => None,
                };
                let mut dead_letters = Vec::new();
                if let (Some(topic), Some(m)) = (topic, message) {
                    let dlq = dlq_topic(state, group).await.map_err(|e| e.to_string())?;
                    let letter = dead_letter(m, &reason, &topic.name, key.1, lease.attempt);
                    dead_letters.push((TopicRef::of(&dlq), letter));
                }
                state
                    .submit(Command::Settle {
                        group: group.to_string(),
                        retry_puts: vec![],
                        retry_deletes: if lease.retry { vec![key] } else { vec![] },
                        dead_letters,
                        now_ms: now,
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                tracing::info!(%group, topic_id = key.0, partition = key.1, offset = key.2,
                    attempts = lease.attempt, %reason, "message dead-lettered");
                Ok(None)
            }
        }
    }
    .await;
    let mut floors = BTreeMap::new();
    let ok = {
        let mut reg = acks(state);
        let Some(g) = reg.groups.get_mut(group) else {
            return false;
        };
        let Some(p) = g.partitions.get_mut(&(key.0, key.1)) else {
            return false;
        };
        match outcome {
            Ok(retry) => {
                if let Some(floor) = p.settle(key.2) {
                    floors.insert((key.0, key.1), floor);
                }
                match retry {
                    // The key stays taken until the retry is settled.
                    Some(record) => g.retries.insert(key, record),
                    None => p.release_key(key.2),
                }
                true
            }
            Err(e) => {
                tracing::warn!(%group, error = %e, "could not record a failed delivery; will try again");
                p.mark_settling(key.2, false);
                false
            }
        }
    };
    commit_floors(state, group, floors).await;
    ok
}

pub(crate) async fn change_invisibility(
    state: &BrokerState,
    group: String,
    receipt: Receipt,
    invisibility_ms: u32,
) -> Result<Reply, ErrorReply> {
    if !(INVISIBILITY_MS_MIN..=INVISIBILITY_MS_MAX).contains(&invisibility_ms) {
        return Err(invalid(format!(
            "invisibility must be {INVISIBILITY_MS_MIN}..={INVISIBILITY_MS_MAX} ms, not {invisibility_ms}"
        )));
    }
    let until = state.now_ms() + invisibility_ms as u64;
    let mut reg = acks(state);
    let nonce = reg.next_nonce();
    let g = reg
        .groups
        .get_mut(&group)
        .ok_or_else(|| stale_or_missing(&group))?;
    let p = g.partitions.get_mut(&(receipt.topic_id, receipt.partition));
    match p {
        Some(p) if p.current(&receipt).is_some() => {
            p.extend(receipt.offset, until, nonce);
            Ok(Reply::Leased { receipt: Receipt { nonce, ..receipt }, invisible_until_ms: until })
        }
        _ => Err(ErrorReply::new(
            ErrorCode::INVALID_ARGUMENT,
            "stale receipt: the lease ended or was replaced; the message is or will be delivered again",
        )),
    }
}

pub(crate) async fn configure(
    state: &BrokerState,
    group: String,
    max_delivery_attempts: u32,
    retry_backoff_ms: Vec<u64>,
    ordered: bool,
) -> Result<Reply, ErrorReply> {
    validate_name("group", &group).map_err(invalid)?;
    let policy = RetryPolicy {
        max_delivery_attempts,
        retry_backoff_ms,
        ordered,
    };
    policy.validate().map_err(invalid)?;
    state
        .submit(Command::SetPolicy {
            group: group.clone(),
            policy: policy.clone(),
        })
        .await
        .map_err(from_write)?;
    acks(state).groups.entry(group.clone()).or_default().policy = policy;
    tracing::info!(%group, max_delivery_attempts, "retry policy set");
    Ok(Reply::Done)
}

/// Turn leases whose invisibility ran out into retries (or dead letters).
pub(crate) async fn expire_leases(state: Arc<BrokerState>) {
    let mut ticker = tokio::time::interval(Duration::from_millis(LEASE_SWEEP_MS));
    loop {
        ticker.tick().await;
        if state.is_shutting_down() {
            return;
        }
        let now = state.now_ms();
        let mut expired = Vec::new();
        {
            let mut reg = acks(&state);
            for (group, g) in reg.groups.iter_mut() {
                for (key, p) in g.partitions.iter_mut() {
                    for (offset, lease) in p.expired(now) {
                        if expired.len() >= EXPIRED_PER_SWEEP_MAX {
                            break;
                        }
                        p.mark_settling(offset, true);
                        expired.push((group.clone(), (key.0, key.1, offset), lease));
                    }
                }
            }
        }
        for (group, key, lease) in expired {
            fail(
                &state,
                &group,
                key,
                lease,
                "invisibility timed out without an ack".into(),
            )
            .await;
        }
    }
}
