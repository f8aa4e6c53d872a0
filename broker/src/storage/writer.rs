//! The single storage writer: group commit.
//!
//! One OS thread owns every redb write transaction. It blocks for the first
//! queued request, drains whatever else is queued (up to
//! `commit_bytes_max`), applies it all in one transaction, commits once, and
//! only then updates the in-memory registry and answers each request.
//!
//! Invariants: offsets are assigned here and nowhere else; a failed commit
//! answers every request in it with an error and changes no in-memory state.

use super::{tables, Durability, StorageError, StoreOptions};
use crate::topics::{Topic, TopicMeta, TopicRegistry};
use redb::Database;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

/// Requests the writer may hold queued before senders wait.
const QUEUE_REQUESTS_MAX: usize = 4096;
/// With `durability = none`, still fsync one commit in this many ms so redb
/// can reuse freed pages and a crash loses at most about this much.
const DURABILITY_NONE_SYNC_MS: u64 = 1000;

/// A change to durable state.
pub enum WriteOp {
    CreateTopic {
        name: String,
        partitions: u32,
        created_at_ms: u64,
    },
    DeleteTopic {
        name: String,
    },
    /// Append batches (one per partition) atomically.
    Append {
        topic: Arc<Topic>,
        appends: Vec<PartitionAppend>,
    },
    /// Store group offsets: (topic id, partition, next offset).
    CommitOffsets {
        group: String,
        offsets: Vec<(u32, u32, u64)>,
    },
}

/// One stored batch for one partition.
pub struct PartitionAppend {
    pub partition: u32,
    pub count: u32,
    /// The encoded batch ([`super::batch::encode`]).
    pub value: Vec<u8>,
}

impl WriteOp {
    fn bytes(&self) -> usize {
        match self {
            WriteOp::Append { appends, .. } => appends.iter().map(|a| a.value.len()).sum(),
            _ => 64,
        }
    }
}

#[derive(Debug)]
pub enum WriteOutcome {
    TopicCreated(Arc<Topic>),
    TopicDeleted,
    /// Base offset of each append, in request order.
    Appended(Vec<u64>),
    OffsetsCommitted,
}

#[derive(Debug, Error, Clone)]
pub enum WriteError {
    #[error("topic {0:?} already exists")]
    TopicExists(String),
    #[error("topic {0:?} does not exist")]
    UnknownTopic(String),
    #[error("storage failure, nothing was written: {0}")]
    Storage(String),
    #[error("the broker is shutting down")]
    ShuttingDown,
}

struct Job {
    op: WriteOp,
    reply: oneshot::Sender<Result<WriteOutcome, WriteError>>,
}

enum Msg {
    Job(Job),
    Shutdown(oneshot::Sender<()>),
}

pub(super) struct WriterHandle {
    tx: mpsc::Sender<Msg>,
}

impl WriterHandle {
    pub(super) async fn write(&self, op: WriteOp) -> Result<WriteOutcome, WriteError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Job(Job { op, reply }))
            .await
            .map_err(|_| WriteError::ShuttingDown)?;
        rx.await.map_err(|_| WriteError::ShuttingDown)?
    }

    pub(super) async fn shutdown(&self, grace: Duration) {
        let (done, rx) = oneshot::channel();
        if self.tx.send(Msg::Shutdown(done)).await.is_ok()
            && tokio::time::timeout(grace, rx).await.is_err()
        {
            tracing::warn!("storage writer did not finish within {grace:?}");
        }
    }
}

pub(super) fn start(
    db: Arc<Database>,
    registry: Arc<TopicRegistry>,
    options: StoreOptions,
    next_topic_id: u32,
) -> WriterHandle {
    let (tx, rx) = mpsc::channel(QUEUE_REQUESTS_MAX);
    let mut writer = Writer {
        db,
        registry,
        options,
        next_topic_id,
        last_sync: Instant::now(),
    };
    std::thread::Builder::new()
        .name("msmq-writer".into())
        .spawn(move || writer.run(rx))
        .expect("spawning the writer thread");
    WriterHandle { tx }
}

struct Writer {
    db: Arc<Database>,
    registry: Arc<TopicRegistry>,
    options: StoreOptions,
    next_topic_id: u32,
    last_sync: Instant,
}

/// In-memory changes that become visible once the commit succeeded.
#[derive(Default)]
struct Effects {
    created: Vec<Arc<Topic>>,
    deleted: Vec<String>,
    /// (topic, partition) → (start, end) after this commit.
    ends: HashMap<(u32, u32), (Arc<Topic>, u64, u64)>,
    next_topic_id: u32,
}

impl Writer {
    fn run(&mut self, mut rx: mpsc::Receiver<Msg>) {
        let mut shutdown: Option<oneshot::Sender<()>> = None;
        while shutdown.is_none() {
            let Some(first) = rx.blocking_recv() else {
                break;
            };
            let mut jobs = Vec::new();
            let mut bytes = 0;
            let mut next = Some(first);
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Job(job) => {
                        bytes += job.op.bytes();
                        jobs.push(job);
                    }
                    Msg::Shutdown(done) => {
                        shutdown = Some(done);
                        break;
                    }
                }
                if bytes < self.options.commit_bytes_max {
                    next = rx.try_recv().ok();
                }
            }
            if !jobs.is_empty() {
                self.commit_group(jobs);
            }
        }
        // Refuse whatever arrived after the shutdown request.
        rx.close();
        while let Ok(msg) = rx.try_recv() {
            if let Msg::Job(job) = msg {
                let _ = job.reply.send(Err(WriteError::ShuttingDown));
            }
        }
        tracing::info!("storage writer stopped");
        if let Some(done) = shutdown {
            let _ = done.send(());
        }
    }

    fn commit_group(&mut self, jobs: Vec<Job>) {
        let started = Instant::now();
        let count = jobs.len();
        let ops: Vec<&WriteOp> = jobs.iter().map(|j| &j.op).collect();
        match self.apply(&ops) {
            Ok((results, effects)) => {
                let appended = !effects.ends.is_empty();
                self.next_topic_id = effects.next_topic_id;
                for topic in effects.created {
                    self.registry.insert(topic);
                }
                for name in effects.deleted {
                    self.registry.remove(&name);
                }
                for ((_, partition), (topic, start, end)) in effects.ends {
                    topic.partitions[partition as usize].set(start, end);
                }
                if appended {
                    self.registry.signal_appended();
                }
                for (job, result) in jobs.into_iter().zip(results) {
                    let _ = job.reply.send(result);
                }
                tracing::trace!(requests = count, elapsed = ?started.elapsed(), "group commit");
            }
            Err(e) => {
                tracing::error!(error = %e, requests = count, "commit failed; refusing its requests");
                let err = WriteError::Storage(e.to_string());
                for job in jobs {
                    let _ = job.reply.send(Err(err.clone()));
                }
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn apply(
        &mut self,
        ops: &[&WriteOp],
    ) -> Result<(Vec<Result<WriteOutcome, WriteError>>, Effects), StorageError> {
        let mut txn = self.db.begin_write()?;
        let sync = match self.options.durability {
            Durability::Immediate => true,
            Durability::None => {
                self.last_sync.elapsed() >= Duration::from_millis(DURABILITY_NONE_SYNC_MS)
            }
        };
        if !sync {
            txn.set_durability(redb::Durability::None)
                .map_err(|e| StorageError::Redb(e.to_string()))?;
        }
        let mut effects = Effects {
            next_topic_id: self.next_topic_id,
            ..Default::default()
        };
        let mut results = Vec::with_capacity(ops.len());
        {
            let mut log = txn.open_table(tables::LOG)?;
            let mut partitions = txn.open_table(tables::PARTITIONS)?;
            let mut topics = txn.open_table(tables::TOPICS)?;
            let mut group_offsets = txn.open_table(tables::GROUP_OFFSETS)?;
            let mut meta = txn.open_table(tables::META)?;
            // Names created or deleted earlier in this same transaction.
            let mut created_here: HashSet<String> = HashSet::new();
            let mut deleted_here: HashSet<u32> = HashSet::new();

            for op in ops {
                let result = match op {
                    WriteOp::CreateTopic {
                        name,
                        partitions: count,
                        created_at_ms,
                    } => {
                        let exists = created_here.contains(name)
                            || self
                                .registry
                                .get(name)
                                .is_some_and(|t| !deleted_here.contains(&t.id()));
                        if exists {
                            Err(WriteError::TopicExists(name.clone()))
                        } else {
                            let topic_meta = TopicMeta {
                                id: effects.next_topic_id,
                                partitions: *count,
                                created_at_ms: *created_at_ms,
                            };
                            effects.next_topic_id += 1;
                            meta.insert(tables::META_NEXT_TOPIC_ID, effects.next_topic_id as u64)?;
                            let encoded =
                                postcard::to_allocvec(&topic_meta).expect("encoding to a Vec");
                            topics.insert(name.as_str(), encoded.as_slice())?;
                            for p in 0..*count {
                                partitions.insert((topic_meta.id, p), (0u64, 0u64))?;
                            }
                            created_here.insert(name.clone());
                            let topic = Arc::new(Topic::new(name.clone(), topic_meta));
                            effects.created.push(topic.clone());
                            Ok(WriteOutcome::TopicCreated(topic))
                        }
                    }
                    WriteOp::DeleteTopic { name } => {
                        match self
                            .registry
                            .get(name)
                            .filter(|t| !deleted_here.contains(&t.id()))
                        {
                            None => Err(WriteError::UnknownTopic(name.clone())),
                            Some(topic) => {
                                let id = topic.id();
                                topics.remove(name.as_str())?;
                                log.retain_in((id, 0, 0)..=(id, u32::MAX, u64::MAX), |_, _| false)?;
                                partitions.retain_in((id, 0)..=(id, u32::MAX), |_, _| false)?;
                                group_offsets.retain(|k, _| k.1 != id)?;
                                deleted_here.insert(id);
                                effects.ends.retain(|k, _| k.0 != id);
                                effects.deleted.push(name.clone());
                                Ok(WriteOutcome::TopicDeleted)
                            }
                        }
                    }
                    WriteOp::Append { topic, appends } => {
                        let live = !deleted_here.contains(&topic.id())
                            && self
                                .registry
                                .get(&topic.name)
                                .is_some_and(|t| t.id() == topic.id());
                        if !live {
                            Err(WriteError::UnknownTopic(topic.name.clone()))
                        } else {
                            let mut bases = Vec::with_capacity(appends.len());
                            for append in appends {
                                let key = (topic.id(), append.partition);
                                let offsets = &topic.partitions[append.partition as usize];
                                let (start, end) = effects
                                    .ends
                                    .get(&key)
                                    .map(|(_, s, e)| (*s, *e))
                                    .unwrap_or((offsets.start(), offsets.end()));
                                log.insert((key.0, key.1, end), append.value.as_slice())?;
                                let new_end = end + append.count as u64;
                                partitions.insert(key, (start, new_end))?;
                                effects.ends.insert(key, (topic.clone(), start, new_end));
                                bases.push(end);
                            }
                            Ok(WriteOutcome::Appended(bases))
                        }
                    }
                    WriteOp::CommitOffsets { group, offsets } => {
                        for (topic_id, partition, offset) in offsets {
                            group_offsets
                                .insert((group.as_str(), *topic_id, *partition), *offset)?;
                        }
                        Ok(WriteOutcome::OffsetsCommitted)
                    }
                };
                results.push(result);
            }
        }
        txn.commit()?;
        if sync {
            self.last_sync = Instant::now();
        }
        Ok((results, effects))
    }
}
