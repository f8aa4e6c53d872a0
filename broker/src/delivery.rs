//! Per-message acknowledgement, as pure logic: leases, out-of-order acks
//! above the committed floor, retries with back-off, dead-lettering.
//!
//! Owns: per group and partition, the messages handed out and not yet
//! settled ([`PartitionLeases`]), and per group the retry schedule
//! ([`RetrySchedule`]) mirroring the durable `retries` table.
//!
//! Invariants:
//! - `floor <= next`; every offset below `floor` is settled (acked,
//!   moved to a retry record, or dead-lettered); the floor is what the group
//!   commits, so a crash redelivers only unsettled messages.
//! - A message has at most one lease at a time; a lease is identified by a
//!   nonce, so a receipt from an older lease is stale.
//! - A message is in the retry schedule or leased as a retry, never both.

use msmq_protocol::Receipt;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// RocketMQ's retry schedule: back-off before attempt 2, 3, …
pub const DEFAULT_RETRY_BACKOFF_MS: [u64; 16] = [
    10_000, 30_000, 60_000, 120_000, 180_000, 240_000, 300_000, 360_000, 420_000, 480_000, 540_000,
    600_000, 1_200_000, 1_800_000, 3_600_000, 7_200_000,
];
/// Deliveries before a message goes to the dead-letter topic.
pub const DEFAULT_MAX_DELIVERY_ATTEMPTS: u32 = 16;
/// Shortest invisibility a receive may ask for.
pub const INVISIBILITY_MS_MIN: u32 = 100;
/// Longest invisibility a receive may ask for (12 h, as RocketMQ).
pub const INVISIBILITY_MS_MAX: u32 = 12 * 3600 * 1000;
/// Most attempts a group may configure.
pub const MAX_DELIVERY_ATTEMPTS_MAX: u32 = 1000;
/// Most steps a configured back-off schedule may have.
pub const RETRY_BACKOFF_STEPS_MAX: usize = 64;
/// Most messages of one partition a group may have handed out and not yet
/// settled (leased or held for their key): bounds broker memory when a
/// consumer receives without acking; it gets nothing new until leases end.
pub const UNSETTLED_PER_PARTITION_MAX: usize = 100_000;
/// Longest single back-off step (7 days).
pub const RETRY_BACKOFF_MS_MAX: u64 = 7 * 24 * 3600 * 1000;

/// A group's retry policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    pub max_delivery_attempts: u32,
    pub retry_backoff_ms: Vec<u64>,
    /// Ordered (FIFO) per message key: a key's next message is delivered
    /// only after the previous one is acked or dead-lettered.
    pub ordered: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_delivery_attempts: DEFAULT_MAX_DELIVERY_ATTEMPTS,
            retry_backoff_ms: DEFAULT_RETRY_BACKOFF_MS.to_vec(),
            ordered: false,
        }
    }
}

impl RetryPolicy {
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=MAX_DELIVERY_ATTEMPTS_MAX).contains(&self.max_delivery_attempts) {
            return Err(format!(
                "max_delivery_attempts must be 1..={MAX_DELIVERY_ATTEMPTS_MAX}, not {}",
                self.max_delivery_attempts
            ));
        }
        if self.retry_backoff_ms.is_empty() || self.retry_backoff_ms.len() > RETRY_BACKOFF_STEPS_MAX
        {
            return Err(format!(
                "retry_backoff_ms needs 1..={RETRY_BACKOFF_STEPS_MAX} steps, not {}",
                self.retry_backoff_ms.len()
            ));
        }
        if let Some(step) = self
            .retry_backoff_ms
            .iter()
            .find(|s| **s > RETRY_BACKOFF_MS_MAX)
        {
            return Err(format!(
                "a back-off step of {step} ms exceeds the {RETRY_BACKOFF_MS_MAX} ms limit"
            ));
        }
        Ok(())
    }

    /// Back-off after failed attempt `attempt` (1-based); the last step repeats.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let i = (attempt.max(1) as usize - 1).min(self.retry_backoff_ms.len().saturating_sub(1));
        Duration::from_millis(self.retry_backoff_ms.get(i).copied().unwrap_or(0))
    }

    /// What happens to a message whose attempt `attempt` failed.
    pub fn after_failure(&self, attempt: u32, now_ms: u64) -> AfterFailure {
        if attempt >= self.max_delivery_attempts {
            AfterFailure::DeadLetter
        } else {
            AfterFailure::RetryAt(now_ms.saturating_add(self.backoff(attempt).as_millis() as u64))
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    RetryAt(u64),
    DeadLetter,
}

/// A retry as stored: key (group, topic id, partition, offset).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryRecord {
    /// The attempt number of the next delivery.
    pub attempt: u32,
    pub due_ms: u64,
    pub reason: String,
}

/// A message handed out and not yet settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub deadline_ms: u64,
    pub attempt: u32,
    pub nonce: u64,
    /// Leased from the retry schedule rather than fresh from the log.
    pub retry: bool,
    /// Being settled (a write is under way): not to be expired or acked twice.
    pub settling: bool,
}

/// One partition of one group in per-message-ack mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLeases {
    pub floor: u64,
    pub next: u64,
    leases: BTreeMap<u64, Lease>,
    /// Log offsets in `floor..next` settled out of order.
    settled: BTreeSet<u64>,
    /// Ordered mode: key hash → the offset that holds the key (leased or
    /// waiting for its retry) until it is acked or dead-lettered.
    key_owner: std::collections::HashMap<u64, u64>,
    owner_key: std::collections::HashMap<u64, u64>,
    /// Ordered mode: offsets read but waiting for their key, → key hash.
    held: BTreeMap<u64, u64>,
}

impl PartitionLeases {
    pub fn new(floor: u64) -> Self {
        PartitionLeases {
            floor,
            next: floor,
            leases: BTreeMap::new(),
            settled: BTreeSet::new(),
            key_owner: std::collections::HashMap::new(),
            owner_key: std::collections::HashMap::new(),
            held: BTreeMap::new(),
        }
    }

    /// Ordered mode: try to take `key_hash` for `offset`; false if another
    /// message of the key is still unsettled.
    pub fn claim_key(&mut self, key_hash: u64, offset: u64) -> bool {
        match self.key_owner.get(&key_hash) {
            Some(owner) if *owner != offset => false,
            _ => {
                self.key_owner.insert(key_hash, offset);
                self.owner_key.insert(offset, key_hash);
                true
            }
        }
    }

    /// Ordered mode: `offset` is done for good (acked or dead-lettered).
    pub fn release_key(&mut self, offset: u64) {
        if let Some(key) = self.owner_key.remove(&offset) {
            if self.key_owner.get(&key) == Some(&offset) {
                self.key_owner.remove(&key);
            }
        }
    }

    /// Ordered mode: keep `offset` until its key is free.
    pub fn hold(&mut self, offset: u64, key_hash: u64) {
        self.held.insert(offset, key_hash);
        self.next = self.next.max(offset + 1);
    }

    /// Held offsets after the group stopped being ordered: all of them.
    pub fn take_all_held(&mut self, limit: usize) -> Vec<(u64, u64)> {
        let taken: Vec<(u64, u64)> = self
            .held
            .iter()
            .take(limit)
            .map(|(o, k)| (*o, *k))
            .collect();
        for (o, _) in &taken {
            self.held.remove(o);
        }
        taken
    }

    pub fn has_held(&self) -> bool {
        !self.held.is_empty()
    }

    /// Ordered mode: held offsets whose key is free, the earliest per key,
    /// removed from the held set (the caller leases them).
    pub fn take_ready(&mut self, limit: usize) -> Vec<(u64, u64)> {
        let mut taken_keys = BTreeSet::new();
        let ready: Vec<(u64, u64)> = self
            .held
            .iter()
            .filter(|(_, k)| {
                let free = !self.key_owner.contains_key(k) && !taken_keys.contains(*k);
                taken_keys.insert(**k);
                free
            })
            .take(limit)
            .map(|(o, k)| (*o, *k))
            .collect();
        for (o, _) in &ready {
            self.held.remove(o);
        }
        ready
    }

    pub fn lease_of(&self, offset: u64) -> Option<&Lease> {
        self.leases.get(&offset)
    }

    pub fn in_flight(&self) -> usize {
        self.leases.len()
    }

    /// How many more fresh messages may be handed out, under `max` unsettled.
    pub fn room(&self, max: usize) -> usize {
        max.saturating_sub(self.leases.len() + self.held.len())
    }

    /// Hand out `offset` (from the log when `retry` is false).
    pub fn lease(&mut self, offset: u64, attempt: u32, deadline_ms: u64, nonce: u64, retry: bool) {
        self.held.remove(&offset);
        if !retry && offset >= self.next {
            self.next = offset + 1;
        }
        self.leases.insert(
            offset,
            Lease {
                deadline_ms,
                attempt,
                nonce,
                retry,
                settling: false,
            },
        );
    }

    /// Record that `offset` (at or above the floor) is already settled by a
    /// stored retry, so the log path must not hand it out again.
    pub fn settled_by_retry(&mut self, offset: u64) {
        if offset >= self.floor {
            self.settled.insert(offset);
        }
    }

    /// Whether the log path must skip `offset` (settled by a retry); if so
    /// `next` moves past it and the floor follows where it can.
    pub fn skip_settled(&mut self, offset: u64) -> bool {
        if offset < self.floor || !self.settled.contains(&offset) {
            return false;
        }
        self.next = self.next.max(offset + 1);
        while self.floor < self.next && self.settled.remove(&self.floor) {
            self.floor += 1;
        }
        true
    }

    /// The live lease a receipt names, if it is still current.
    pub fn current(&self, receipt: &Receipt) -> Option<Lease> {
        self.leases
            .get(&receipt.offset)
            .copied()
            .filter(|l| l.nonce == receipt.nonce && !l.settling)
    }

    pub fn mark_settling(&mut self, offset: u64, settling: bool) {
        if let Some(l) = self.leases.get_mut(&offset) {
            l.settling = settling;
        }
    }

    /// Give a lease a new deadline and nonce.
    pub fn extend(&mut self, offset: u64, deadline_ms: u64, nonce: u64) {
        if let Some(l) = self.leases.get_mut(&offset) {
            l.deadline_ms = deadline_ms;
            l.nonce = nonce;
        }
    }

    /// The lease is over (acked, retried or dead-lettered). Returns the new
    /// floor when it moved.
    pub fn settle(&mut self, offset: u64) -> Option<u64> {
        let lease = self.leases.remove(&offset)?;
        if lease.retry {
            // Retries are below the floor already.
            return None;
        }
        let before = self.floor;
        if offset == self.floor {
            // In-order acks, the common case: no bookkeeping above the floor.
            self.floor += 1;
        } else {
            self.settled.insert(offset);
        }
        while self.floor < self.next && self.settled.remove(&self.floor) {
            self.floor += 1;
        }
        (self.floor != before).then_some(self.floor)
    }

    /// Leases past their deadline, not already being settled.
    pub fn expired(&self, now_ms: u64) -> Vec<(u64, Lease)> {
        self.leases
            .iter()
            .filter(|(_, l)| l.deadline_ms <= now_ms && !l.settling)
            .map(|(o, l)| (*o, *l))
            .collect()
    }
}

/// Retries of one group, by due time.
#[derive(Debug, Default)]
pub struct RetrySchedule {
    records: BTreeMap<(u32, u32, u64), RetryRecord>,
    by_due: BTreeSet<(u64, u32, u32, u64)>,
}

impl RetrySchedule {
    pub fn insert(&mut self, key: (u32, u32, u64), record: RetryRecord) {
        self.remove(key);
        self.by_due.insert((record.due_ms, key.0, key.1, key.2));
        self.records.insert(key, record);
    }

    pub fn remove(&mut self, key: (u32, u32, u64)) -> Option<RetryRecord> {
        let old = self.records.remove(&key)?;
        self.by_due.remove(&(old.due_ms, key.0, key.1, key.2));
        Some(old)
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn get(&self, key: (u32, u32, u64)) -> Option<&RetryRecord> {
        self.records.get(&key)
    }

    /// Offsets with a retry record on one partition.
    pub fn offsets_of(&self, topic_id: u32, partition: u32) -> Vec<u64> {
        self.records
            .range((topic_id, partition, 0)..=(topic_id, partition, u64::MAX))
            .map(|(k, _)| k.2)
            .collect()
    }

    /// Drop every retry of a topic (it was deleted or its group reset).
    pub fn remove_topic(&mut self, topic_id: u32) -> Vec<(u32, u32, u64)> {
        let keys: Vec<_> = self
            .records
            .keys()
            .filter(|k| k.0 == topic_id)
            .copied()
            .collect();
        for k in &keys {
            self.remove(*k);
        }
        keys
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Due retries of one partition, earliest first.
    pub fn due(
        &self,
        topic_id: u32,
        partition: u32,
        now_ms: u64,
        limit: usize,
    ) -> Vec<(u64, RetryRecord)> {
        self.by_due
            .range(..=(now_ms, u32::MAX, u32::MAX, u64::MAX))
            .filter(|(_, t, p, _)| *t == topic_id && *p == partition)
            .take(limit)
            .map(|(_, t, p, o)| (*o, self.records[&(*t, *p, *o)].clone()))
            .collect()
    }
}

/// Per-message-ack state of one group.
#[derive(Debug, Default)]
pub struct GroupAcks {
    pub policy: RetryPolicy,
    pub partitions: std::collections::HashMap<(u32, u32), PartitionLeases>,
    pub retries: RetrySchedule,
}

/// Per-message-ack state of every group that uses it.
#[derive(Debug, Default)]
pub struct AckRegistry {
    pub groups: std::collections::HashMap<String, GroupAcks>,
    nonce: u64,
}

impl AckRegistry {
    /// A fresh lease nonce (never repeats within a broker process; seeded
    /// from the clock so receipts from before a restart are stale).
    pub fn next_nonce(&mut self) -> u64 {
        if self.nonce == 0 {
            self.nonce = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1);
        }
        self.nonce += 1;
        self.nonce
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt(offset: u64, nonce: u64) -> Receipt {
        Receipt {
            topic_id: 1,
            partition: 0,
            offset,
            nonce,
        }
    }

    #[test]
    fn the_floor_moves_only_over_settled_offsets() {
        let mut p = PartitionLeases::new(10);
        for o in 10..15 {
            p.lease(o, 1, 1000, o, false);
        }
        assert_eq!(p.next, 15);
        assert_eq!(p.settle(12), None, "a gap below holds the floor");
        assert_eq!(p.settle(10), Some(11));
        assert_eq!(p.settle(11), Some(13), "jumps over the out-of-order ack");
        assert_eq!(p.settle(11), None, "settling twice does nothing");
        assert_eq!(p.settle(14), None);
        assert_eq!(p.settle(13), Some(15));
        assert_eq!(p.in_flight(), 0);
    }

    #[test]
    fn stale_receipts_and_expiry() {
        let mut p = PartitionLeases::new(0);
        p.lease(0, 1, 100, 7, false);
        assert!(p.current(&receipt(0, 7)).is_some());
        p.extend(0, 500, 8);
        assert!(
            p.current(&receipt(0, 7)).is_none(),
            "the old receipt is stale"
        );
        assert!(p.expired(400).is_empty());
        assert_eq!(p.expired(500).len(), 1);
        p.mark_settling(0, true);
        assert!(
            p.expired(500).is_empty(),
            "not expired twice while settling"
        );
        assert!(p.current(&receipt(0, 8)).is_none());
    }

    #[test]
    fn stored_retries_above_the_floor_are_skipped_by_the_log_path() {
        let mut p = PartitionLeases::new(10);
        p.settled_by_retry(11);
        p.settled_by_retry(3); // below the floor: nothing to do
        p.lease(10, 1, 100, 1, false);
        assert!(!p.skip_settled(10));
        assert!(p.skip_settled(11));
        assert_eq!(p.next, 12);
        assert_eq!(p.floor, 10, "10 is still leased");
        assert_eq!(p.settle(10), Some(12), "the floor passes the retried 11");
    }

    #[test]
    fn huge_back_off_steps_are_refused() {
        let p = RetryPolicy {
            max_delivery_attempts: 2,
            retry_backoff_ms: vec![u64::MAX],
            ordered: false,
        };
        assert!(p.validate().is_err());
        assert_eq!(
            p.after_failure(1, u64::MAX - 5),
            AfterFailure::RetryAt(u64::MAX)
        );
    }

    #[test]
    fn ordered_keys_wait_for_the_previous_message() {
        let mut p = PartitionLeases::new(0);
        assert!(p.claim_key(7, 0));
        p.lease(0, 1, 100, 1, false);
        assert!(!p.claim_key(7, 1));
        p.hold(1, 7);
        assert!(!p.claim_key(7, 2));
        p.hold(2, 7);
        assert!(p.claim_key(8, 3), "another key proceeds");
        assert!(p.take_ready(10).is_empty(), "key 7 is busy");
        p.settle(0);
        p.release_key(0);
        assert_eq!(
            p.take_ready(10),
            vec![(1, 7)],
            "only the earliest of the key"
        );
        assert!(p.claim_key(7, 1));
        assert!(p.take_ready(10).is_empty());
        assert_eq!(p.floor, 1, "held messages hold the floor");
    }

    #[test]
    fn unsettled_messages_are_capped() {
        let mut p = PartitionLeases::new(0);
        for o in 0..3 {
            p.lease(o, 1, 100, o, false);
        }
        p.hold(3, 9);
        assert_eq!(p.room(5), 1, "one below the limit");
        p.lease(4, 1, 100, 4, false);
        assert_eq!(p.room(5), 0, "at the limit");
        p.lease(5, 1, 100, 5, false);
        assert_eq!(
            p.room(5),
            0,
            "past the limit there is no room, not an underflow"
        );
        p.settle(0);
        p.settle(1);
        assert_eq!(p.room(5), 1);
    }

    #[test]
    fn retries_do_not_move_the_floor() {
        let mut p = PartitionLeases::new(5);
        p.lease(2, 3, 100, 1, true);
        assert_eq!(p.next, 5);
        assert_eq!(p.settle(2), None);
        assert_eq!(p.floor, 5);
    }

    #[test]
    fn back_off_and_dead_letter() {
        let policy = RetryPolicy {
            max_delivery_attempts: 3,
            retry_backoff_ms: vec![100, 200],
            ordered: false,
        };
        assert_eq!(policy.after_failure(1, 1000), AfterFailure::RetryAt(1100));
        assert_eq!(policy.after_failure(2, 1000), AfterFailure::RetryAt(1200));
        assert_eq!(policy.after_failure(3, 1000), AfterFailure::DeadLetter);
        assert_eq!(
            RetryPolicy {
                max_delivery_attempts: 9,
                ..policy.clone()
            }
            .backoff(7),
            Duration::from_millis(200)
        );
        assert!(policy.validate().is_ok());
        assert!(RetryPolicy {
            max_delivery_attempts: 0,
            ..policy.clone()
        }
        .validate()
        .is_err());
        assert!(RetryPolicy {
            retry_backoff_ms: vec![],
            ..policy
        }
        .validate()
        .is_err());
        let d = RetryPolicy::default();
        assert_eq!(d.max_delivery_attempts, 16);
        assert_eq!(d.backoff(1), Duration::from_secs(10));
        assert_eq!(d.backoff(16), Duration::from_secs(7200));
    }

    #[test]
    fn the_retry_schedule_is_per_partition_and_ordered() {
        let mut s = RetrySchedule::default();
        let r = |due| RetryRecord {
            attempt: 2,
            due_ms: due,
            reason: String::new(),
        };
        s.insert((1, 0, 5), r(300));
        s.insert((1, 0, 3), r(100));
        s.insert((1, 1, 9), r(50));
        let due: Vec<u64> = s.due(1, 0, 300, 10).into_iter().map(|(o, _)| o).collect();
        assert_eq!(due, vec![3, 5]);
        assert!(s.due(1, 0, 99, 10).is_empty());
        s.insert((1, 0, 3), r(1000));
        assert_eq!(s.due(1, 0, 300, 10).len(), 1);
        assert!(s.remove((1, 0, 5)).is_some());
        assert_eq!(s.len(), 2);
    }
}
