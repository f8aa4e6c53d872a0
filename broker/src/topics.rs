//! The in-memory view of topics and their partitions' offsets.
//!
//! Owns: name → [`Topic`], each partition's committed start and end offsets,
//! and the "something was appended" signal long-polls wait on.
//!
//! Invariants: only the storage writer changes this registry, and only after
//! the redb commit that made the change durable, so a reader that sees an end
//! offset can read every message below it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use tokio::sync::watch;

/// A topic as stored in the `topics` table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TopicMeta {
    pub id: u32,
    pub partitions: u32,
    pub created_at_ms: u64,
}

pub struct Topic {
    pub name: String,
    pub meta: TopicMeta,
    pub partitions: Vec<PartitionOffsets>,
    /// Round-robin cursor for keyless produce requests.
    next_spread: AtomicU32,
}

/// Committed offsets of one partition: messages `start..end` are readable.
#[derive(Default)]
pub struct PartitionOffsets {
    start: AtomicU64,
    end: AtomicU64,
}

impl PartitionOffsets {
    pub fn start(&self) -> u64 {
        self.start.load(Ordering::Acquire)
    }

    pub fn end(&self) -> u64 {
        self.end.load(Ordering::Acquire)
    }

    pub(crate) fn set(&self, start: u64, end: u64) {
        self.start.store(start, Ordering::Release);
        self.end.store(end, Ordering::Release);
    }
}

impl std::fmt::Debug for Topic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topic")
            .field("name", &self.name)
            .field("meta", &self.meta)
            .finish()
    }
}

impl Topic {
    pub fn new(name: String, meta: TopicMeta) -> Self {
        let partitions = (0..meta.partitions)
            .map(|_| PartitionOffsets::default())
            .collect();
        Topic {
            name,
            meta,
            partitions,
            next_spread: AtomicU32::new(0),
        }
    }

    pub fn id(&self) -> u32 {
        self.meta.id
    }

    pub fn partition_count(&self) -> u32 {
        self.meta.partitions
    }

    pub fn partition(&self, partition: u32) -> Option<&PartitionOffsets> {
        self.partitions.get(partition as usize)
    }

    /// The partition for a message: by key hash when it has a key, else the
    /// partition `spread` chose for its request.
    pub fn partition_for_key(&self, key: Option<&[u8]>, spread: u32) -> u32 {
        match key {
            Some(key) => (xxhash_rust::xxh3::xxh3_64(key) % self.meta.partitions as u64) as u32,
            None => spread,
        }
    }

    /// The next partition in turn for keyless messages.
    pub fn next_spread_partition(&self) -> u32 {
        self.next_spread.fetch_add(1, Ordering::Relaxed) % self.meta.partitions
    }
}

/// All topics, by name.
pub struct TopicRegistry {
    topics: RwLock<HashMap<String, Arc<Topic>>>,
    appended: watch::Sender<u64>,
    /// (topic id, partition) → group → committed offset, for backlog limits.
    committed: std::sync::Mutex<HashMap<(u32, u32), HashMap<String, u64>>>,
}

impl Default for TopicRegistry {
    fn default() -> Self {
        TopicRegistry {
            topics: RwLock::new(HashMap::new()),
            appended: watch::Sender::new(0),
            committed: std::sync::Mutex::new(HashMap::new()),
        }
    }
}

impl TopicRegistry {
    pub fn get(&self, name: &str) -> Option<Arc<Topic>> {
        self.topics.read().expect("topic lock").get(name).cloned()
    }

    pub fn list(&self) -> Vec<Arc<Topic>> {
        let mut all: Vec<_> = self
            .topics
            .read()
            .expect("topic lock")
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    pub fn partitions_of(&self, name: &str) -> Option<u32> {
        self.get(name).map(|t| t.partition_count())
    }

    pub(crate) fn insert(&self, topic: Arc<Topic>) {
        self.topics
            .write()
            .expect("topic lock")
            .insert(topic.name.clone(), topic);
    }

    pub(crate) fn remove(&self, name: &str) -> Option<Arc<Topic>> {
        self.topics.write().expect("topic lock").remove(name)
    }

    /// Record a group's committed offset (after the commit that stored it).
    pub(crate) fn set_committed(&self, group: &str, topic_id: u32, partition: u32, offset: u64) {
        self.committed
            .lock()
            .expect("committed lock")
            .entry((topic_id, partition))
            .or_default()
            .insert(group.to_string(), offset);
    }

    /// Every group's committed offset on a partition.
    pub fn committed_groups(&self, topic_id: u32, partition: u32) -> Vec<(String, u64)> {
        self.committed
            .lock()
            .expect("committed lock")
            .get(&(topic_id, partition))
            .map(|groups| groups.iter().map(|(g, o)| (g.clone(), *o)).collect())
            .unwrap_or_default()
    }

    /// A group's committed offset on a partition, as last stored.
    pub fn committed_offset(&self, group: &str, topic_id: u32, partition: u32) -> Option<u64> {
        self.committed
            .lock()
            .expect("committed lock")
            .get(&(topic_id, partition))
            .and_then(|groups| groups.get(group).copied())
    }

    /// Forget a removed group's committed offsets.
    pub(crate) fn forget_group(&self, group: &str) {
        for groups in self.committed.lock().expect("committed lock").values_mut() {
            groups.remove(group);
        }
    }

    /// Forget a deleted topic's committed offsets.
    pub(crate) fn forget_committed(&self, topic_id: u32) {
        self.committed
            .lock()
            .expect("committed lock")
            .retain(|k, _| k.0 != topic_id);
    }

    /// Messages of a partition not yet consumed by its slowest group (all
    /// stored messages when no group committed on it).
    pub fn backlog(&self, topic: &Topic, partition: u32) -> u64 {
        let Some(offsets) = topic.partition(partition) else {
            return 0;
        };
        let slowest = self
            .committed
            .lock()
            .expect("committed lock")
            .get(&(topic.id(), partition))
            .and_then(|groups| groups.values().min().copied())
            .unwrap_or(offsets.start());
        offsets.end().saturating_sub(slowest.max(offsets.start()))
    }

    /// Wake every long-poll: new messages were committed.
    pub(crate) fn signal_appended(&self) {
        self.appended.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that changes whenever messages are committed.
    pub fn subscribe_appended(&self) -> watch::Receiver<u64> {
        self.appended.subscribe()
    }
}
