//! Durable state: one redb file with the log's index, topics, partition
//! offsets, consumer-group offsets and everything else, and the log's batch
//! bytes in segment files beside it.
//!
//! Owns: the redb [`Database`] (behind [`db::Db`], which reopens it after an
//! I/O error), the table layout ([`tables`]), the segment
//! files ([`segments`]), the single writer thread (`writer`), the read paths
//! ([`read`]) and, for tests, a fault-injecting storage backend ([`faults`]).
//!
//! Invariants:
//! - Every change goes through the one writer, which commits many queued
//!   requests in one redb transaction (group commit) and answers them only
//!   after that commit returned; with `durability = immediate` that means
//!   after fsync.
//! - A partition's stored `end` offset changes in the same transaction as the
//!   batches it covers, so after any crash the log and its offsets agree and
//!   no offset is reused.
//! - Reads use redb read transactions and never block the writer.

pub mod batch;
pub mod db;
#[cfg(test)]
mod determinism;
pub mod digest;
pub mod faults;
pub mod frames;
pub mod read;
pub mod recording;
pub mod segments;
pub mod tables;
mod writer;

use crate::command::Command;
use crate::topics::{Topic, TopicMeta, TopicRegistry};
use crate::transactions::{HalfRecord, PendingTx, TxSchedule};
pub use db::ReadSource;
use redb::{Database, ReadableDatabase, ReadableTable};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
pub use writer::{
    Landed, WriteError, WriteOutcome, CRASH_BEFORE_INDEX_COMMIT, TOPIC_PARTITIONS_MAX,
};

/// A message waiting for its delivery time.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ScheduledRecord {
    pub topic_id: u32,
    pub topic: String,
    pub partition: u32,
    pub message: msmq_protocol::NewMessage,
}

/// The hash messages are indexed by key with.
pub fn key_hash(key: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(key)
}

/// `(index in batch, key hash)` of every keyed message of a batch.
pub fn key_hashes<'a>(
    messages: impl IntoIterator<Item = &'a msmq_protocol::NewMessage>,
) -> Vec<(u32, u64)> {
    messages
        .into_iter()
        .enumerate()
        .filter_map(|(i, m)| m.key.as_ref().map(|k| (i as u32, key_hash(k))))
        .collect()
}

/// `next_scheduled_ms` when nothing is scheduled.
pub const NOTHING_SCHEDULED: u64 = u64::MAX;

/// Name of the redb file inside the data directory.
pub const DB_FILE_NAME: &str = "msmq.redb";

/// When to fsync a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Every commit is fsynced before any request in it is acknowledged.
    Immediate,
    /// Commits are not fsynced (one in every `DURABILITY_NONE_SYNC_MS` is):
    /// a power cut may lose acknowledged messages. Explicit opt-in only.
    None,
}

impl std::str::FromStr for Durability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "immediate" => Ok(Durability::Immediate),
            "none" => Ok(Durability::None),
            other => Err(format!(
                "durability must be 'immediate' or 'none', not {other:?}"
            )),
        }
    }
}

/// What storage reports as it works, for whoever keeps figures (the
/// metrics registry implements it). Storage itself keeps no metrics, so it
/// imports nothing from the layers above it.
pub trait StorageObserver: Send + Sync {
    /// A group commit of `requests` requests and `bytes` bytes succeeded.
    fn group_committed(&self, requests: usize, bytes: usize, elapsed: Duration);
    /// Dead letters and plugin retries a committed request stored.
    fn settled(&self, dead_letters: u64, retries: u64);
    /// A group commit failed; its requests were refused.
    fn commit_failed(&self);
    /// The database refuses writes and is being reopened (`true`), or
    /// takes writes again (`false`).
    fn recovering(&self, recovering: bool);
    /// Batch bytes written to segment files.
    fn segments_written(&self, bytes: u64);
    /// Segment files synced before a commit.
    fn segments_synced(&self, files: usize);
}

/// An observer that keeps nothing (tools that open a store offline).
pub struct NoObserver;

impl StorageObserver for NoObserver {
    fn group_committed(&self, _: usize, _: usize, _: Duration) {}
    fn settled(&self, _: u64, _: u64) {}
    fn commit_failed(&self) {}
    fn recovering(&self, _: bool) {}
    fn segments_written(&self, _: u64) {}
    fn segments_synced(&self, _: usize) {}
}

#[derive(Clone)]
pub struct StoreOptions {
    pub durability: Durability,
    /// redb page cache.
    pub cache_bytes: usize,
    /// Stop draining the queue into one transaction past this many bytes.
    pub commit_bytes_max: usize,
    /// The largest and oldest a segment gets; topics with a retention roll
    /// sooner ([`segments::Roll::for_retention`]).
    pub segment_roll_max: segments::Roll,
    /// Zero-fill the next segment file ahead of time while the writer is
    /// latency-bound (`segments::prefill`).
    pub segment_prefill: bool,
    /// Retention of topics without their own: (max age in ms, max bytes),
    /// 0 meaning no limit.
    pub retention_default: (u64, u64),
    /// Told about commits, failures and segment writes.
    pub observer: std::sync::Arc<dyn StorageObserver>,
    /// Record every applied command to this file ([`recording`]).
    pub record_commands: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreOptions")
            .field("durability", &self.durability)
            .field("cache_bytes", &self.cache_bytes)
            .field("commit_bytes_max", &self.commit_bytes_max)
            .field("segment_roll_max", &self.segment_roll_max)
            .field("segment_prefill", &self.segment_prefill)
            .field("retention_default", &self.retention_default)
            .field("record_commands", &self.record_commands)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Error)]
pub enum StorageError {
    #[error("opening {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("storage failure: {0}")]
    Redb(String),
    #[error("corrupt data: {0}")]
    Corrupt(String),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StorageError {
            fn from(e: $t) -> Self { StorageError::Redb(e.to_string()) }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// The broker's storage: the database plus its writer.
pub struct Store {
    db: Arc<db::Db>,
    segments: Arc<segments::Segments>,
    writer: writer::WriterHandle,
    store_id: u64,
    schedule: Arc<Mutex<TxSchedule>>,
    next_scheduled_ms: Arc<std::sync::atomic::AtomicU64>,
}

impl Store {
    /// Open (or create) the database in `dir`, load every topic into
    /// `registry`, and start the writer.
    pub fn open(
        dir: &Path,
        options: StoreOptions,
        registry: Arc<TopicRegistry>,
    ) -> Result<Store, StorageError> {
        std::fs::create_dir_all(dir).map_err(|e| StorageError::Open {
            path: dir.display().to_string(),
            reason: e.to_string(),
        })?;
        let db = db::Db::open(dir, DB_FILE_NAME, options.cache_bytes)?;
        let faults_on = db.faults_on();
        let (segments, store_id, counters, schedule, next_scheduled_ms, replay) =
            db.with(|db| {
                tables::create_all(db)?;
                let (segments, replay) = segments::Segments::recover(
                    dir,
                    db,
                    faults_on.then(|| dir.join(faults::FAULTS_DIR)),
                )?;
                let segments = Arc::new(segments);
                load_topics(db, &registry)?;
                for (group, topic_id, partition, offset) in read::all_group_offsets(db)? {
                    registry.set_committed(&group, topic_id, partition, offset);
                }
                let (store_id, counters) = load_counters(db)?;
                let schedule = Arc::new(Mutex::new(load_schedule(db)?));
                let next_scheduled_ms =
                    Arc::new(std::sync::atomic::AtomicU64::new(first_scheduled(db)?));
                Ok((
                    segments,
                    store_id,
                    counters,
                    schedule,
                    next_scheduled_ms,
                    replay,
                ))
            })?;
        let db = Arc::new(db);
        let recorder = match &options.record_commands {
            Some(path) => Some(recording::Recorder::open(path, counters.applied_index)?),
            None => None,
        };
        let writer = writer::start(
            db.clone(),
            faults_on.then(|| dir.join(faults::FAULTS_DIR)),
            segments.clone(),
            registry,
            schedule.clone(),
            next_scheduled_ms.clone(),
            options,
            counters,
            recorder,
            replay,
        )?;
        Ok(Store {
            db,
            segments,
            writer,
            store_id,
            schedule,
            next_scheduled_ms,
        })
    }

    /// The database, for reads (`read::*` take it as a [`ReadSource`]).
    pub fn db(&self) -> &Arc<db::Db> {
        &self.db
    }

    /// The log's segment files, for reads.
    pub fn segments(&self) -> &Arc<segments::Segments> {
        &self.segments
    }

    /// This store's random id: the first half of every message id.
    pub fn store_id(&self) -> u64 {
        self.store_id
    }

    /// When the earliest scheduled message is due ([`NOTHING_SCHEDULED`] if none).
    pub fn next_scheduled_ms(&self) -> u64 {
        self.next_scheduled_ms
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Pending transactions by next check time (kept current by the writer).
    pub fn schedule(&self) -> &Arc<Mutex<TxSchedule>> {
        &self.schedule
    }

    /// Queue one change and wait until it is committed (or failed).
    pub async fn write(&self, op: Command) -> Result<WriteOutcome, WriteError> {
        self.writer.write(op).await
    }

    /// Queue several changes at once (they usually share one commit) and
    /// wait for all; results in order.
    pub async fn write_many(&self, ops: Vec<Command>) -> Vec<Result<WriteOutcome, WriteError>> {
        self.writer.write_many(ops).await
    }

    /// Stop the writer (committing what is queued) and close the database,
    /// so the directory can be opened again in this process.
    pub async fn close(self, grace: Duration) {
        self.writer.shutdown(grace).await;
        self.db.close();
    }

    /// Commit everything queued, then stop the writer. Later writes fail with
    /// [`WriteError::ShuttingDown`].
    pub async fn shutdown(&self, grace: Duration) {
        self.writer.shutdown(grace).await
    }
}

/// The store id and the counters the writer hands out.
fn load_counters(db: &impl ReadSource) -> Result<(u64, writer::Counters), StorageError> {
    let txn = db.read_txn()?;
    let meta = txn.open_table(tables::META)?;
    let get = |key: &str, default: u64| -> Result<u64, StorageError> {
        Ok(meta.get(key)?.map(|v| v.value()).unwrap_or(default))
    };
    let store_id = get(tables::META_STORE_ID, 0)?;
    let counters = writer::Counters {
        next_topic_id: get(tables::META_NEXT_TOPIC_ID, 1)? as u32,
        next_message_sequence: get(tables::META_NEXT_MESSAGE_SEQUENCE, 1)?,
        next_tx_id: get(tables::META_NEXT_TX_ID, 1)?,
        applied_index: get(tables::META_APPLIED_INDEX, 0)?,
    };
    Ok((store_id, counters))
}

/// Due time of the earliest scheduled message.
fn first_scheduled(db: &Database) -> Result<u64, StorageError> {
    let txn = db.begin_read()?;
    let table = txn.open_table(tables::SCHEDULED)?;
    let first = table
        .first()?
        .map(|(k, _)| k.value().0)
        .unwrap_or(NOTHING_SCHEDULED);
    Ok(first)
}

/// Every pending (not discarded) half message, for the check-back loop.
fn load_schedule(db: &Database) -> Result<TxSchedule, StorageError> {
    let txn = db.begin_read()?;
    let halves = txn.open_table(tables::HALF_MESSAGES)?;
    let mut schedule = TxSchedule::default();
    for entry in halves.iter()? {
        let (tx_id, value) = entry?;
        let record: HalfRecord = postcard::from_bytes(value.value())
            .map_err(|e| StorageError::Corrupt(format!("half message {}: {e}", tx_id.value())))?;
        if !record.discarded {
            schedule.upsert(
                tx_id.value(),
                PendingTx {
                    producer_group: record.producer_group,
                    check_count: record.check_count,
                    next_check_at_ms: record.next_check_at_ms,
                },
            );
        }
    }
    if !schedule.is_empty() {
        tracing::info!(pending = schedule.len(), "loaded pending transactions");
    }
    Ok(schedule)
}

/// Load topics and partition offsets into the registry.
fn load_topics(db: &Database, registry: &TopicRegistry) -> Result<(), StorageError> {
    let txn = db.begin_read()?;
    let topics = txn.open_table(tables::TOPICS)?;
    let partitions = txn.open_table(tables::PARTITIONS)?;
    for entry in topics.iter()? {
        let (name, value) = entry?;
        let topic_meta: TopicMeta = postcard::from_bytes(value.value())
            .map_err(|e| StorageError::Corrupt(format!("topic {}: {e}", name.value())))?;
        let topic = Topic::new(name.value().to_string(), topic_meta);
        for p in 0..topic.partition_count() {
            let (start, end) = partitions
                .get((topic.id(), p))?
                .map(|v| v.value())
                .unwrap_or((0, 0));
            topic.partitions[p as usize].set(start, end);
        }
        tracing::info!(topic = %topic.name, partitions = topic.partition_count(), "loaded topic");
        registry.insert(Arc::new(topic));
    }
    Ok(())
}
