//! The single storage writer: group commit.
//!
//! One OS thread owns every redb write transaction. It blocks for the first
//! queued request, drains whatever else is queued (up to
//! `commit_bytes_max`), applies it all in one transaction, commits once, and
//! only then updates the in-memory state (topics, offsets, the transaction
//! schedule) and answers each request.
//!
//! Invariants: offsets, message-id sequences, topic ids and transaction ids
//! are assigned here and nowhere else; a failed commit answers every request
//! in it with an error and changes no in-memory state.
//!
//! Size: this file is over 800 lines because it applies every `Command`;
//! it is to be split into one module per command family (topics and log,
//! groups and acks, transactions, plugins, access).

use super::segments::{SegmentId, SegmentReaper, Segments};
use super::{batch, tables, Durability, StorageError, StoreOptions};
use crate::command::{Command, PartitionAppend, PluginCommit, TopicRef};
use crate::producers::{
    self, Admission, Claim, Placement, ProducerError, ProducerRecord, StoredReply,
};
use crate::topics::{Topic, TopicMeta, TopicRegistry};
use crate::transactions::{HalfRecord, OutcomeRecord, PendingTx, TxOutcome, TxSchedule, TxSource};
use msmq_protocol::NewMessage;
use redb::{ReadableTable, ReadableTableMetadata};
mod recovery;

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

/// The most partitions a topic can have, whatever `partitions_max` says
/// (that setting is checked when a request arrives, this when a command is
/// applied).
pub const TOPIC_PARTITIONS_MAX: u32 = 65_536;
/// Requests the writer may hold queued before senders wait.
const QUEUE_REQUESTS_MAX: usize = 4096;
/// Test fault switch (with `MSMQ_STORAGE_FAULTS=1`): answer every request
/// before its commit, then commit after [`ACK_BEFORE_COMMIT_DELAY_MS`]. A
/// deliberately broken broker, for showing that the crash driver's oracle
/// catches acknowledged writes that are lost.
pub const ACK_BEFORE_COMMIT: &str = "ack-before-commit";
const ACK_BEFORE_COMMIT_DELAY_MS: u64 = 20;
/// With `durability = none`, still fsync one commit in this many ms so redb
/// can reuse freed pages and a crash loses at most about this much.
const DURABILITY_NONE_SYNC_MS: u64 = 1000;

/// Where a committed message landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Landed {
    pub partition: u32,
    pub offset: u64,
    pub sequence: u64,
}

#[derive(Debug, Clone)]
pub enum WriteOutcome {
    TopicCreated(Arc<Topic>),
    TopicDeleted,
    /// (base offset, base message sequence) of each append, in request
    /// order, and the message sequence of each scheduled message.
    Appended(Vec<(u64, u64)>, Vec<u64>),
    /// Scheduled messages moved into their logs.
    Released(usize),
    OffsetsCommitted,
    /// (transaction id, message sequence) per half message, in request order.
    HalfStored(Vec<(u64, u64)>),
    /// A sequenced request that was stored before: its original reply.
    Repeated(StoredReply),
    /// (producer id, epoch).
    ProducerInit(u64, u32),
    /// Producer records removed.
    ProducersExpired(u64),
    /// The transaction is committed (now, or already before: idempotent).
    TxCommitted(Landed),
    /// The transaction is rolled back (now, or already before).
    TxRolledBack,
    /// The check count after counting; `None`: no longer pending.
    CheckCounted(Option<u32>),
    /// Whether a pending transaction was discarded.
    Discarded(bool),
    Resumed,
    Pruned(u64),
    Settled,
    PolicySet,
    PluginStored,
    PluginRemoved(bool),
    PluginCommitted,
    /// Batches and messages removed.
    Trimmed {
        batches: usize,
        messages: u64,
    },
    RetentionSet,
    /// Rows now pointing into segments, and segments the mover must stop
    /// appending to because retention deleted them.
    MovedToSegments {
        moved: usize,
        gone: Vec<SegmentId>,
    },
    /// Whether the token existed (for a revoke).
    TokenStored(bool),
    AclSet,
}

#[derive(Debug, Error, Clone)]
pub enum WriteError {
    #[error("topic {0:?} already exists")]
    TopicExists(String),
    #[error("topic {0:?} does not exist")]
    UnknownTopic(String),
    #[error(
        "transaction {0} is unknown (never existed, or resolved long enough ago to be forgotten)"
    )]
    UnknownTransaction(u64),
    #[error("transaction {tx_id} {reason}")]
    TransactionResolved { tx_id: u64, reason: String },
    #[error("transaction {tx_id} belongs to producer group {owner:?}, not {requester:?}")]
    WrongProducerGroup {
        tx_id: u64,
        owner: String,
        requester: String,
    },
    #[error("plugin {0:?} was removed or redeployed; the batch's effects were not written")]
    PluginGone(String),
    #[error("{0}")]
    Invalid(String),
    #[error("storage failure, the request was not applied: {0}")]
    Storage(String),
    #[error("a stored record could not be read, nothing was written: {0}")]
    Corrupt(String),
    #[error("the broker is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Producer(#[from] ProducerError),
    #[error("the broker holds producers_max = {0} producer ids; idle ones expire after producer_idle_expiry")]
    ProducersFull(u32),
}

type Reply = oneshot::Sender<Result<WriteOutcome, WriteError>>;

/// Work on this store that changes nothing clients can observe, so it is no
/// [`Command`]: a replica or a replay does its own.
#[derive(Debug)]
pub enum LocalOp {
    /// From the mover: batches now durable in segment files. Each `log` row
    /// still holding its batch becomes the pointer given, and each segment's
    /// length is recorded, unless retention deleted the segment meanwhile.
    MoveToSegments {
        /// (topic id, partition, base offset, pointer row)
        moves: Vec<(u32, u32, u64, Vec<u8>)>,
        lengths: Vec<(SegmentId, u64)>,
    },
}

/// What the writer applies: a command, or local work.
enum Op {
    Command(Command),
    Local(LocalOp),
}

impl Op {
    fn bytes(&self) -> usize {
        match self {
            Op::Command(c) => c.bytes(),
            Op::Local(_) => 64,
        }
    }
}

struct Job {
    op: Op,
    /// Taken when answered early (the `ack-before-commit` test fault).
    reply: Option<Reply>,
}

enum Msg {
    Job(Job),
    Shutdown(oneshot::Sender<()>),
}

#[derive(Clone)]
pub(super) struct WriterHandle {
    tx: mpsc::Sender<Msg>,
}

impl WriterHandle {
    pub(super) async fn write(&self, command: Command) -> Result<WriteOutcome, WriteError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Job(Job {
                op: Op::Command(command),
                reply: Some(reply),
            }))
            .await
            .map_err(|_| WriteError::ShuttingDown)?;
        rx.await.map_err(|_| WriteError::ShuttingDown)?
    }

    /// Local work, from a thread outside the async runtime.
    pub(super) fn local_blocking(&self, op: LocalOp) -> Result<WriteOutcome, WriteError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .blocking_send(Msg::Job(Job {
                op: Op::Local(op),
                reply: Some(reply),
            }))
            .map_err(|_| WriteError::ShuttingDown)?;
        rx.blocking_recv().map_err(|_| WriteError::ShuttingDown)?
    }

    pub(super) async fn write_many(
        &self,
        commands: Vec<Command>,
    ) -> Vec<Result<WriteOutcome, WriteError>> {
        let mut waiting = Vec::with_capacity(commands.len());
        for command in commands {
            let (reply, rx) = oneshot::channel();
            let sent = self
                .tx
                .send(Msg::Job(Job {
                    op: Op::Command(command),
                    reply: Some(reply),
                }))
                .await
                .is_ok();
            waiting.push(sent.then_some(rx));
        }
        let mut results = Vec::with_capacity(waiting.len());
        for rx in waiting {
            results.push(match rx {
                Some(rx) => rx.await.unwrap_or(Err(WriteError::ShuttingDown)),
                None => Err(WriteError::ShuttingDown),
            });
        }
        results
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

/// Counters the writer hands out, loaded from the `meta` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Counters {
    pub next_topic_id: u32,
    pub next_message_sequence: u64,
    pub next_tx_id: u64,
    /// Write transactions that applied commands, so far.
    pub applied_index: u64,
}

impl Counters {
    /// Hand out `count` consecutive message-id sequences; returns the first.
    fn take_sequences(&mut self, count: u64) -> u64 {
        let first = self.next_message_sequence;
        self.next_message_sequence += count;
        first
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn start(
    db: Arc<super::db::Db>,
    fault_switches: Option<std::path::PathBuf>,
    segments: Arc<Segments>,
    registry: Arc<TopicRegistry>,
    schedule: Arc<Mutex<TxSchedule>>,
    next_scheduled_ms: Arc<AtomicU64>,
    options: StoreOptions,
    counters: Counters,
    recorder: Option<super::recording::Recorder>,
) -> WriterHandle {
    let (tx, rx) = mpsc::channel(QUEUE_REQUESTS_MAX);
    let mut writer = Writer {
        db,
        fault_switches,
        reaper: RefCell::new(SegmentReaper::new(segments)),
        registry,
        schedule,
        next_scheduled_ms,
        options,
        counters,
        recorder,
        last_sync: Instant::now(),
        recovering: None,
    };
    std::thread::Builder::new()
        .name("msmq-writer".into())
        .spawn(move || writer.run(rx))
        .expect("spawning the writer thread");
    WriterHandle { tx }
}

struct Writer {
    db: Arc<super::db::Db>,
    /// For tests: the directory of fault switch files.
    fault_switches: Option<std::path::PathBuf>,
    reaper: RefCell<SegmentReaper>,
    registry: Arc<TopicRegistry>,
    schedule: Arc<Mutex<TxSchedule>>,
    next_scheduled_ms: Arc<AtomicU64>,
    options: StoreOptions,
    counters: Counters,
    /// Where applied commands are recorded, when `record_commands` is set.
    recorder: Option<super::recording::Recorder>,
    last_sync: Instant,
    /// Set while the database refuses writes after an I/O error and the
    /// writer reopens it; every write is refused meanwhile.
    recovering: Option<recovery::Recovery>,
}

enum ScheduleChange {
    Upsert(u64, PendingTx),
    Remove(u64),
}

/// In-memory changes that become visible once the commit succeeded.
struct Effects {
    created: Vec<Arc<Topic>>,
    /// Ids of topics deleted by this commit (some maybe created by it).
    deleted: Vec<u32>,
    /// (topic, partition) → (start, end) after this commit.
    ends: HashMap<(u32, u32), (Arc<Topic>, u64, u64)>,
    schedule: Vec<ScheduleChange>,
    counters: Counters,
    /// Group offsets stored by this commit: (group, topic id, partition, offset).
    committed: Vec<(String, u32, u32, u64)>,
    /// Groups whose offsets this commit deleted.
    forgotten_groups: Vec<String>,
    /// Earliest due time of scheduled messages after this commit.
    next_scheduled_ms: u64,
    /// `next_scheduled_ms` was recomputed from the table (not just lowered).
    scheduled_recomputed: bool,
}

/// The tables of one write transaction.
struct Tables<'t> {
    log: redb::Table<'t, (u32, u32, u64), &'static [u8]>,
    segments: redb::Table<'t, (u32, u32, u64), u64>,
    batch_times: redb::Table<'t, (u32, u32, u64), u64>,
    batch_bytes: redb::Table<'t, (u32, u32, u64), u64>,
    retention: redb::Table<'t, u32, (u64, u64)>,
    tokens: redb::Table<'t, &'static str, &'static [u8]>,
    acls: redb::Table<'t, &'static str, &'static [u8]>,
    partitions: redb::Table<'t, (u32, u32), (u64, u64)>,
    topics: redb::Table<'t, &'static str, &'static [u8]>,
    group_offsets: redb::Table<'t, (&'static str, u32, u32), u64>,
    meta: redb::Table<'t, &'static str, u64>,
    halves: redb::Table<'t, u64, &'static [u8]>,
    outcomes: redb::Table<'t, u64, &'static [u8]>,
    retries: redb::Table<'t, (&'static str, u32, u32, u64), &'static [u8]>,
    scheduled: redb::Table<'t, (u64, u64), &'static [u8]>,
    id_index: redb::Table<'t, u64, (u32, u32, u64, u32)>,
    key_index: redb::Table<'t, (u32, u64, u32, u64), ()>,
    policies: redb::Table<'t, &'static str, &'static [u8]>,
    plugins: redb::Table<'t, &'static str, &'static [u8]>,
    plugin_components: redb::Table<'t, &'static str, &'static [u8]>,
    plugin_state: redb::Table<'t, (&'static str, &'static [u8]), &'static [u8]>,
    plugin_retries: redb::Table<'t, (&'static str, u32, u32, u64), (u64, u32)>,
    producers: redb::Table<'t, u64, &'static [u8]>,
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(value).expect("encoding to a Vec cannot fail")
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, StorageError> {
    postcard::from_bytes(bytes).map_err(|e| StorageError::Corrupt(format!("{what}: {e}")))
}

impl Writer {
    fn run(&mut self, mut rx: mpsc::Receiver<Msg>) {
        let mut shutdown: Option<oneshot::Sender<()>> = None;
        while shutdown.is_none() {
            let Some(first) = self.next_message(&mut rx) else {
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
                if let Some(reply) = job.reply {
                    let _ = reply.send(Err(WriteError::ShuttingDown));
                }
            }
        }
        tracing::info!("storage writer stopped");
        if let Some(done) = shutdown {
            let _ = done.send(());
        }
    }

    fn commit_group(&mut self, jobs: Vec<Job>) {
        if self.recovering.is_some() {
            self.try_recover();
        }
        if let Some(recovery) = &self.recovering {
            let err = WriteError::Storage(if recovery.needs_restart {
                format!(
                    "storage takes no writes after an I/O error: {}",
                    recovery.cause
                )
            } else {
                format!(
                    "storage is reopening its database after an I/O error ({}); writes resume \
                     once that succeeds, retry later",
                    recovery.cause
                )
            });
            for job in jobs {
                if let Some(reply) = job.reply {
                    let _ = reply.send(Err(err.clone()));
                }
            }
            return;
        }
        let started = Instant::now();
        let count = jobs.len();
        let bytes: usize = jobs.iter().map(|j| j.op.bytes()).sum();
        let mut jobs = jobs;
        // Test fault: answer before committing, and commit late, so a crash
        // in between loses acknowledged writes; the crash driver must see it.
        let mut early: Vec<Option<Reply>> = if self.fault_on(ACK_BEFORE_COMMIT) {
            jobs.iter_mut().map(|j| j.reply.take()).collect()
        } else {
            Vec::new()
        };
        let mut answer_early = |results: &[Result<WriteOutcome, WriteError>]| {
            if early.is_empty() {
                return;
            }
            for (reply, result) in early.iter_mut().zip(results) {
                if let Some(reply) = reply.take() {
                    let _ = reply.send(result.clone());
                }
            }
            std::thread::sleep(Duration::from_millis(ACK_BEFORE_COMMIT_DELAY_MS));
        };
        let mut ops: Vec<&mut Op> = jobs.iter_mut().map(|j| &mut j.op).collect();
        let applied = self.apply(&mut ops, &mut answer_early);
        match &applied {
            Ok(_) => self.reaper.borrow_mut().committed(),
            Err(_) => self.reaper.borrow_mut().failed(),
        }
        match applied {
            Ok((results, effects)) => {
                let appended = !effects.ends.is_empty();
                self.counters = effects.counters;
                if effects.scheduled_recomputed {
                    self.next_scheduled_ms
                        .store(effects.next_scheduled_ms, Ordering::Release);
                } else {
                    self.next_scheduled_ms
                        .fetch_min(effects.next_scheduled_ms, Ordering::AcqRel);
                }
                // Ids are never reused: drop what was deleted, then add
                // what was created and survived, whatever the order inside.
                for id in &effects.deleted {
                    let gone = self.registry.list().into_iter().find(|t| t.id() == *id);
                    if let Some(topic) = gone {
                        self.registry.remove(&topic.name);
                        self.registry.forget_committed(*id);
                    }
                }
                for topic in effects.created {
                    if !effects.deleted.contains(&topic.id()) {
                        self.registry.insert(topic);
                    }
                }
                for group in effects.forgotten_groups {
                    self.registry.forget_group(&group);
                }
                for (group, topic_id, partition, offset) in effects.committed {
                    self.registry
                        .set_committed(&group, topic_id, partition, offset);
                }
                for ((_, partition), (topic, start, end)) in effects.ends {
                    topic.partitions[partition as usize].set(start, end);
                }
                if !effects.schedule.is_empty() {
                    let mut schedule = self.schedule.lock().expect("schedule lock");
                    for change in effects.schedule {
                        match change {
                            ScheduleChange::Upsert(id, tx) => schedule.upsert(id, tx),
                            ScheduleChange::Remove(id) => schedule.remove(id),
                        }
                    }
                }
                if appended {
                    self.registry.signal_appended();
                }
                let observer = &self.options.observer;
                for (job, result) in jobs.into_iter().zip(results) {
                    if result.is_ok() {
                        count_settled(observer.as_ref(), &job.op);
                    }
                    if let Some(reply) = job.reply {
                        let _ = reply.send(result);
                    }
                }
                tracing::trace!(requests = count, elapsed = ?started.elapsed(), "group commit");
                observer.group_committed(count, bytes, started.elapsed());
            }
            Err(e) => {
                tracing::error!(error = %e, requests = count, "commit failed; refusing its requests");
                self.options.observer.commit_failed();
                let err = WriteError::Storage(e.to_string());
                for job in jobs {
                    if let Some(reply) = job.reply {
                        let _ = reply.send(Err(err.clone()));
                    }
                }
                // redb latches an I/O error: every later transaction fails
                // until the database is closed and opened again.
                if self.db.needs_reopen() {
                    tracing::error!(error = %e, "the database refuses writes after an I/O error; reopening it");
                    self.options.observer.recovering(true);
                    self.recovering = Some(recovery::Recovery::new(e.to_string()));
                    self.try_recover();
                }
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn apply(
        &mut self,
        ops: &mut [&mut Op],
        before_commit: &mut dyn FnMut(&[Result<WriteOutcome, WriteError>]),
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
        let mut fx = Effects {
            created: Vec::new(),
            deleted: Vec::new(),
            ends: HashMap::new(),
            schedule: Vec::new(),
            counters: self.counters,
            next_scheduled_ms: self.next_scheduled_ms.load(Ordering::Acquire),
            scheduled_recomputed: false,
            committed: Vec::new(),
            forgotten_groups: Vec::new(),
        };
        // Recorded as submitted: applying fills in message-id sequences.
        let recorded = match &self.recorder {
            Some(_) => {
                let commands: Vec<&Command> = ops
                    .iter()
                    .filter_map(|op| match &**op {
                        Op::Command(c) => Some(c),
                        Op::Local(_) => None,
                    })
                    .collect();
                (!commands.is_empty()).then(|| crate::command::encode_refs(&commands))
            }
            None => None,
        };
        if ops.iter().any(|op| matches!(**op, Op::Command(_))) {
            fx.counters.applied_index += 1;
        }
        let mut results = Vec::with_capacity(ops.len());
        {
            let mut t = Tables {
                log: txn.open_table(tables::LOG)?,
                segments: txn.open_table(tables::SEGMENTS)?,
                batch_times: txn.open_table(tables::BATCH_TIMES)?,
                batch_bytes: txn.open_table(tables::BATCH_BYTES)?,
                retention: txn.open_table(tables::TOPIC_RETENTION)?,
                tokens: txn.open_table(tables::TOKENS)?,
                acls: txn.open_table(tables::ACLS)?,
                partitions: txn.open_table(tables::PARTITIONS)?,
                topics: txn.open_table(tables::TOPICS)?,
                group_offsets: txn.open_table(tables::GROUP_OFFSETS)?,
                meta: txn.open_table(tables::META)?,
                halves: txn.open_table(tables::HALF_MESSAGES)?,
                outcomes: txn.open_table(tables::TX_OUTCOMES)?,
                retries: txn.open_table(tables::RETRIES)?,
                scheduled: txn.open_table(tables::SCHEDULED)?,
                id_index: txn.open_table(tables::ID_INDEX)?,
                key_index: txn.open_table(tables::KEY_INDEX)?,
                policies: txn.open_table(tables::GROUP_POLICIES)?,
                plugins: txn.open_table(tables::PLUGINS)?,
                plugin_components: txn.open_table(tables::PLUGIN_COMPONENTS)?,
                plugin_state: txn.open_table(tables::PLUGIN_STATE)?,
                plugin_retries: txn.open_table(tables::PLUGIN_RETRIES)?,
                producers: txn.open_table(tables::PRODUCERS)?,
            };
            let mut scope = Scope::default();
            for op in ops.iter_mut() {
                results.push(self.apply_one(op, &mut t, &mut fx, &mut scope)?);
            }
            if fx.counters.next_message_sequence != self.counters.next_message_sequence {
                t.meta.insert(
                    tables::META_NEXT_MESSAGE_SEQUENCE,
                    fx.counters.next_message_sequence,
                )?;
            }
            if fx.counters.next_tx_id != self.counters.next_tx_id {
                t.meta
                    .insert(tables::META_NEXT_TX_ID, fx.counters.next_tx_id)?;
            }
            if fx.counters.applied_index != self.counters.applied_index {
                t.meta
                    .insert(tables::META_APPLIED_INDEX, fx.counters.applied_index)?;
            }
            if fx.counters.next_topic_id != self.counters.next_topic_id {
                t.meta
                    .insert(tables::META_NEXT_TOPIC_ID, fx.counters.next_topic_id as u64)?;
            }
        }
        let sync = sync || {
            // Delete files only after a durable commit: a commit redb never
            // persisted would come back naming them.
            let deletes = self.reaper.borrow().deletes_files();
            if deletes {
                txn.set_durability(redb::Durability::Immediate)
                    .map_err(|e| StorageError::Redb(e.to_string()))?;
            }
            deletes
        };
        before_commit(&results);
        if let (Some(recorder), Some(encoded)) = (&mut self.recorder, &recorded) {
            recorder.append(fx.counters.applied_index, encoded)?;
        }
        let committed = txn.commit();
        if let Some(recorder) = &mut self.recorder {
            match (&committed, &recorded) {
                (Ok(()), Some(_)) => recorder.committed(),
                (Err(_), Some(_)) => recorder.failed(),
                _ => {}
            }
        }
        committed?;
        if sync {
            self.last_sync = Instant::now();
        }
        Ok((results, fx))
    }

    /// Apply a [`Command::MoveToSegments`]. A segment may take rows if it is
    /// in the `segments` table or is new, that is based at or past its
    /// partition's start: retention deletes only segments wholly below the
    /// start, so one without a row that is based below it was deleted while
    /// the mover wrote to it. Its rows stay inline for a later move.
    fn move_to_segments(
        &self,
        t: &mut Tables,
        moves: &[(u32, u32, u64, Vec<u8>)],
        lengths: &[(SegmentId, u64)],
    ) -> Result<WriteOutcome, StorageError> {
        let mut usable = HashSet::new();
        let mut gone = Vec::new();
        // In base order per partition: once a segment is gone, so are the
        // later ones of its partition, or rows would reach segments out of
        // offset order.
        let mut lengths = lengths.to_vec();
        lengths.sort_unstable();
        let mut gone_partitions = HashSet::new();
        for (id, length) in lengths {
            let key = (id.topic, id.partition, id.base);
            let start = t
                .partitions
                .get((id.topic, id.partition))?
                .map(|v| v.value().0);
            let known = t.segments.get(key)?.is_some();
            let partition_gone = gone_partitions.contains(&(id.topic, id.partition));
            match start {
                Some(start) if !partition_gone && (known || id.base >= start) => {
                    t.segments.insert(key, length)?;
                    usable.insert(id);
                }
                _ => {
                    gone.push(id);
                    gone_partitions.insert((id.topic, id.partition));
                    if !known {
                        // Never named by a row, or already deleted: either
                        // way nothing points into it.
                        self.reaper.borrow_mut().doom(id);
                    }
                }
            }
        }
        let mut moved = 0;
        for (topic, partition, base, row) in moves {
            let Some(at) = batch::pointer(row).map_err(StorageError::Corrupt)? else {
                continue;
            };
            let segment = SegmentId {
                topic: *topic,
                partition: *partition,
                base: at.segment,
            };
            if !usable.contains(&segment) {
                continue;
            }
            let key = (*topic, *partition, *base);
            let inline = match t.log.get(key)? {
                Some(v) => batch::pointer(v.value())
                    .map_err(StorageError::Corrupt)?
                    .is_none(),
                None => false,
            };
            if inline {
                t.log.insert(key, row.as_slice())?;
                moved += 1;
            }
        }
        Ok(WriteOutcome::MovedToSegments { moved, gone })
    }

    /// Delete stored components no plugin record refers to.
    fn drop_unused_components(t: &mut Tables) -> Result<(), StorageError> {
        let mut used = HashSet::new();
        for entry in t.plugins.iter()? {
            let (_, v) = entry?;
            let record: crate::command::PluginRecord = decode(v.value(), "plugin record")?;
            used.insert(record.component_sha256);
        }
        t.plugin_components.retain(|hash, _| used.contains(hash))?;
        Ok(())
    }

    fn plugin_commit(
        &self,
        c: &mut PluginCommit,
        t: &mut Tables,
        fx: &mut Effects,
        scope: &Scope,
    ) -> Result<Result<WriteOutcome, WriteError>, StorageError> {
        // Check first: a refused commit must change nothing.
        let live = match t.plugins.get(c.plugin.as_str())? {
            Some(v) => {
                let record: crate::command::PluginRecord = decode(v.value(), "plugin record")?;
                record.incarnation == c.incarnation
            }
            None => false,
        };
        if !live {
            return Ok(Err(WriteError::PluginGone(c.plugin.clone())));
        }
        let dead_topic = c
            .publishes
            .iter()
            .map(|(t, _)| t)
            .chain(c.dead_letters.iter().map(|(t, _)| t))
            .find(|t| self.live(t, fx, scope).is_none());
        if let Some(topic) = dead_topic {
            return Ok(Err(WriteError::UnknownTopic(topic.name.clone())));
        }
        for (topic, appends) in &c.publishes {
            let topic = self.live(topic, fx, scope).expect("checked above");
            if let Err(e) = partitions_exist(&topic, appends.iter().map(|a| a.partition)) {
                return Ok(Err(e));
            }
        }
        let plugin = c.plugin.as_str();
        for (key, value) in &c.state {
            match value {
                Some(v) => t
                    .plugin_state
                    .insert((plugin, key.as_slice()), v.as_slice())?,
                None => t.plugin_state.remove((plugin, key.as_slice()))?,
            };
        }
        for (key, (due, attempt)) in &c.retry_puts {
            t.plugin_retries
                .insert((plugin, key.0, key.1, key.2), (*due, *attempt))?;
        }
        for key in &c.retry_deletes {
            t.plugin_retries.remove((plugin, key.0, key.1, key.2))?;
        }
        for (topic, appends) in c.publishes.iter_mut() {
            let topic = self.live(topic, fx, scope).expect("checked above");
            for append in appends.iter_mut() {
                self.append_with_ids(t, fx, &topic, append)?;
            }
        }
        for (topic, message) in &c.dead_letters {
            let topic = self.live(topic, fx, scope).expect("checked above");
            self.append_dead_letter(t, fx, &topic, message, c.now_ms)?;
        }
        for (topic_id, partition, offset) in &c.offsets {
            t.group_offsets
                .insert((c.group.as_str(), *topic_id, *partition), *offset)?;
            fx.committed
                .push((c.group.clone(), *topic_id, *partition, *offset));
        }
        Ok(Ok(WriteOutcome::PluginCommitted))
    }

    /// Whether a test fault switch is on.
    fn fault_on(&self, switch: &str) -> bool {
        self.fault_switches
            .as_ref()
            .is_some_and(|dir| dir.join(switch).exists())
    }

    /// The topic a command names, if it is still the live topic of its
    /// name in this transaction (created by an earlier command of it
    /// included): the same answer whatever commits the commands share.
    fn live(&self, topic: &TopicRef, fx: &Effects, scope: &Scope) -> Option<Arc<Topic>> {
        self.live_named(&topic.name, fx, scope)
            .filter(|t| t.id() == topic.id)
    }

    /// The live topic of a name in this transaction: created by an earlier
    /// command of it, or committed before, and not deleted since.
    fn live_named(&self, name: &str, fx: &Effects, scope: &Scope) -> Option<Arc<Topic>> {
        fx.created
            .iter()
            .rev()
            .find(|t| t.name == name && !scope.deleted.contains(&t.id()))
            .cloned()
            .or_else(|| {
                self.registry
                    .get(name)
                    .filter(|t| !scope.deleted.contains(&t.id()))
            })
    }

    /// Append a dead letter to partition 0 of its dead-letter topic.
    fn append_dead_letter(
        &self,
        t: &mut Tables,
        fx: &mut Effects,
        topic: &Arc<Topic>,
        message: &NewMessage,
        now_ms: u64,
    ) -> Result<(), StorageError> {
        let sequence = fx.counters.take_sequences(1);
        let mut value = batch::encode(now_ms, &[message]);
        batch::set_base_sequence(&mut value, sequence);
        self.append(t, fx, topic, 0, 1, &value, &super::key_hashes([message]))?;
        Ok(())
    }

    /// Remove whole batches of a partition below `before` (at most
    /// `batches_max`), with their index entries, and move the partition's
    /// start to the first batch kept.
    fn trim(
        &self,
        t: &mut Tables,
        fx: &mut Effects,
        topic: &Arc<Topic>,
        partition: u32,
        before: u64,
        batches_max: usize,
    ) -> Result<WriteOutcome, StorageError> {
        let id = topic.id();
        let key = (id, partition);
        let offsets = &topic.partitions[partition as usize];
        let (start, end) = fx
            .ends
            .get(&key)
            .map(|(_, s, e)| (*s, *e))
            .unwrap_or((offsets.start(), offsets.end()));
        let before = before.min(end);
        let mut doomed = Vec::new();
        for entry in t.log.range((id, partition, 0)..(id, partition, before))? {
            let (k, v) = entry?;
            let base = k.value().2;
            let value = v.value();
            let Ok(h) = batch::header(value) else {
                doomed.push((base, 0, None, Vec::new()));
                continue;
            };
            // Only whole batches go: the batch must end at or below `before`.
            if base + h.count as u64 > before {
                break;
            }
            let mut keys = Vec::new();
            let loaded;
            let records = match batch::pointer(value) {
                Ok(None) => Some(value),
                Ok(Some(at)) if at.has_keys => {
                    let reaper = self.reaper.borrow();
                    loaded = reaper
                        .segments()
                        .read(id, partition, &at)
                        .inspect_err(|e| {
                            tracing::warn!(topic = %topic.name, partition, offset = base, error = %e,
                                "reading a trimmed batch's keys failed; its key index rows stay")
                        })
                        .ok()
                        .flatten();
                    loaded.as_deref()
                }
                _ => None,
            };
            if let Some(records) = records {
                let _ = batch::decode_from(records, 0, base, base, |m| {
                    if let Some(k) = m.key {
                        keys.push((super::key_hash(&k), m.offset));
                    }
                    true
                });
            }
            doomed.push((base, h.count, Some(h.base_sequence), keys));
            if doomed.len() >= batches_max {
                break;
            }
        }
        let mut messages = 0u64;
        let mut new_start = start;
        for (base, count, sequence, keys) in &doomed {
            t.log.remove((id, partition, *base))?;
            t.batch_times.remove((id, partition, *base))?;
            t.batch_bytes.remove((id, partition, *base))?;
            if let Some(sequence) = sequence {
                t.id_index.remove(*sequence)?;
            }
            for (hash, offset) in keys {
                t.key_index.remove((id, *hash, partition, *offset))?;
            }
            messages += *count as u64;
            new_start = new_start.max(base + *count as u64);
        }
        if !doomed.is_empty() {
            // The first batch kept starts where the last removed one ended.
            let next = t
                .log
                .range((id, partition, new_start)..(id, partition, u64::MAX))?
                .next()
                .transpose()?
                .map(|(k, _)| k.value().2)
                .unwrap_or(end);
            new_start = new_start.max(next.min(end)).min(end);
            self.reaper
                .borrow_mut()
                .trim(&mut t.segments, id, partition, new_start, end)?;
            t.partitions.insert(key, (new_start, end))?;
            fx.ends.insert(key, (topic.clone(), new_start, end));
        }
        Ok(WriteOutcome::Trimmed {
            batches: doomed.len(),
            messages,
        })
    }

    /// Give a batch its message ids and append it; returns (base offset,
    /// base message-id sequence).
    fn append_with_ids(
        &self,
        t: &mut Tables,
        fx: &mut Effects,
        topic: &Arc<Topic>,
        append: &mut PartitionAppend,
    ) -> Result<(u64, u64), StorageError> {
        let sequence = fx.counters.take_sequences(append.count as u64);
        batch::set_base_sequence(&mut append.value, sequence);
        let base = self.append(
            t,
            fx,
            topic,
            append.partition,
            append.count,
            &append.value,
            &append.key_hashes,
        )?;
        Ok((base, sequence))
    }

    /// Append one stored batch to the log, where it stays until the mover
    /// moves it to a segment file. Returns its base offset.
    #[allow(clippy::too_many_arguments)]
    fn append(
        &self,
        t: &mut Tables,
        fx: &mut Effects,
        topic: &Arc<Topic>,
        partition: u32,
        count: u32,
        value: &[u8],
        key_hashes: &[(u32, u64)],
    ) -> Result<u64, StorageError> {
        let key = (topic.id(), partition);
        let offsets = &topic.partitions[partition as usize];
        let (start, end) = fx
            .ends
            .get(&key)
            .map(|(_, s, e)| (*s, *e))
            .unwrap_or((offsets.start(), offsets.end()));
        t.log.insert((key.0, key.1, end), value)?;
        if let Ok(h) = batch::header(value) {
            t.batch_times.insert((key.0, key.1, end), h.timestamp_ms)?;
            t.batch_bytes
                .insert((key.0, key.1, end), value.len() as u64)?;
            t.id_index
                .insert(h.base_sequence, (key.0, key.1, end, h.count))?;
        }
        for (i, hash) in key_hashes {
            t.key_index
                .insert((key.0, *hash, key.1, end + *i as u64), ())?;
        }
        let new_end = end + count as u64;
        t.partitions.insert(key, (start, new_end))?;
        fx.ends.insert(key, (topic.clone(), start, new_end));
        Ok(end)
    }

    fn apply_one(
        &self,
        op: &mut Op,
        t: &mut Tables,
        fx: &mut Effects,
        scope: &mut Scope,
    ) -> Result<Result<WriteOutcome, WriteError>, StorageError> {
        let command = match op {
            Op::Local(LocalOp::MoveToSegments { moves, lengths }) => {
                return Ok(Ok(self.move_to_segments(t, moves, lengths)?));
            }
            Op::Command(command) => command,
        };
        Ok(match command {
            Command::CreateTopic {
                name,
                partitions: count,
                created_at_ms,
            } => {
                let exists = self.live_named(name, fx, scope).is_some();
                if !(1..=TOPIC_PARTITIONS_MAX).contains(count) {
                    Err(WriteError::Invalid(format!(
                        "a topic has 1 to {TOPIC_PARTITIONS_MAX} partitions, not {count}"
                    )))
                } else if exists {
                    Err(WriteError::TopicExists(name.clone()))
                } else {
                    let meta = TopicMeta {
                        id: fx.counters.next_topic_id,
                        partitions: *count,
                        created_at_ms: *created_at_ms,
                    };
                    fx.counters.next_topic_id += 1;
                    t.topics.insert(name.as_str(), encode(&meta).as_slice())?;
                    for p in 0..*count {
                        t.partitions.insert((meta.id, p), (0u64, 0u64))?;
                    }
                    let topic = Arc::new(Topic::new(name.clone(), meta));
                    fx.created.push(topic.clone());
                    Ok(WriteOutcome::TopicCreated(topic))
                }
            }
            Command::DeleteTopic { name } => match self.live_named(name, fx, scope) {
                None => Err(WriteError::UnknownTopic(name.clone())),
                Some(topic) => {
                    let id = topic.id();
                    t.topics.remove(name.as_str())?;
                    t.log
                        .retain_in((id, 0, 0)..=(id, u32::MAX, u64::MAX), |_, _| false)?;
                    self.reaper.borrow_mut().drop_topic(&mut t.segments, id)?;
                    t.partitions
                        .retain_in((id, 0)..=(id, u32::MAX), |_, _| false)?;
                    t.batch_times
                        .retain_in((id, 0, 0)..=(id, u32::MAX, u64::MAX), |_, _| false)?;
                    t.batch_bytes
                        .retain_in((id, 0, 0)..=(id, u32::MAX, u64::MAX), |_, _| false)?;
                    t.retention.remove(id)?;
                    t.retries.retain(|k, _| k.1 != id)?;
                    t.plugin_retries.retain(|k, _| k.1 != id)?;
                    t.id_index.retain(|_, v| v.0 != id)?;
                    t.key_index.retain_in(
                        (id, 0, 0, 0)..=(id, u64::MAX, u32::MAX, u64::MAX),
                        |_, _| false,
                    )?;
                    t.group_offsets.retain(|k, _| k.1 != id)?;
                    scope.deleted.insert(id);
                    fx.ends.retain(|k, _| k.0 != id);
                    fx.deleted.push(id);
                    Ok(WriteOutcome::TopicDeleted)
                }
            },
            Command::Append {
                topic,
                appends,
                scheduled,
                producer,
            } => {
                let admitted = match producer {
                    Some((claim, _)) => admit_claim(t, claim)?,
                    None => Ok(None),
                };
                let partitions = appends
                    .iter()
                    .map(|a| a.partition)
                    .chain(scheduled.iter().map(|s| s.0));
                let Some(live) = self.live(topic, fx, scope) else {
                    return Ok(Err(WriteError::UnknownTopic(topic.name.clone())));
                };
                if let Err(e) = partitions_exist(&live, partitions) {
                    Err(e)
                } else if let Err(e) = admitted {
                    Err(e)
                } else if let Ok(Some(reply)) = admitted {
                    Ok(WriteOutcome::Repeated(reply))
                } else {
                    let topic = &live;
                    let mut sequences = Vec::with_capacity(scheduled.len());
                    for (partition, due_ms, message) in scheduled.iter() {
                        let sequence = fx.counters.take_sequences(1);
                        let record = super::ScheduledRecord {
                            topic_id: topic.id(),
                            topic: topic.name.clone(),
                            partition: *partition,
                            message: NewMessage {
                                deliver_at_ms: None,
                                ..message.clone()
                            },
                        };
                        t.scheduled
                            .insert((*due_ms, sequence), encode(&record).as_slice())?;
                        fx.next_scheduled_ms = fx.next_scheduled_ms.min(*due_ms);
                        sequences.push(sequence);
                    }
                    let mut bases = Vec::with_capacity(appends.len());
                    for append in appends.iter_mut() {
                        bases.push(self.append_with_ids(t, fx, topic, append)?);
                    }
                    if let Some((claim, slots)) = producer {
                        let appended = appends
                            .iter()
                            .zip(&bases)
                            .map(|(a, (base, sequence))| (a.partition, *base, *sequence))
                            .collect();
                        let placement = Placement::new(slots, appended, sequences.clone());
                        remember_claim(t, claim, StoredReply::Produced(placement))?;
                    }
                    Ok(WriteOutcome::Appended(bases, sequences))
                }
            }
            Command::ReleaseDue { now_ms, max } => {
                let mut released = 0;
                let mut due = Vec::new();
                for entry in t.scheduled.range(..=(*now_ms, u64::MAX))?.take(*max) {
                    let (k, v) = entry?;
                    due.push((k.value(), v.value().to_vec()));
                }
                for ((due_ms, sequence), bytes) in due {
                    t.scheduled.remove((due_ms, sequence))?;
                    let record: super::ScheduledRecord = match decode(&bytes, "scheduled message") {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::error!(error = %e, "unreadable scheduled message dropped");
                            continue;
                        }
                    };
                    let named = TopicRef {
                        id: record.topic_id,
                        name: record.topic.clone(),
                    };
                    let topic = self
                        .live(&named, fx, scope)
                        .filter(|topic| record.partition < topic.partition_count());
                    let Some(topic) = topic else {
                        tracing::info!(topic = %record.topic, "scheduled message dropped: its topic was deleted");
                        continue;
                    };
                    let mut value = batch::encode(*now_ms, &[&record.message]);
                    batch::set_base_sequence(&mut value, sequence);
                    let keys = super::key_hashes([&record.message]);
                    self.append(t, fx, &topic, record.partition, 1, &value, &keys)?;
                    released += 1;
                }
                fx.next_scheduled_ms = t
                    .scheduled
                    .first()?
                    .map(|(k, _)| k.value().0)
                    .unwrap_or(super::NOTHING_SCHEDULED);
                fx.scheduled_recomputed = true;
                Ok(WriteOutcome::Released(released))
            }
            Command::CommitOffsets { group, offsets } => {
                for (topic_id, partition, offset) in offsets {
                    t.group_offsets
                        .insert((group.as_str(), *topic_id, *partition), *offset)?;
                    fx.committed
                        .push((group.clone(), *topic_id, *partition, *offset));
                }
                Ok(WriteOutcome::OffsetsCommitted)
            }
            Command::PinOffsets { group, offsets } => {
                for (topic_id, partition, offset) in offsets {
                    let key = (group.as_str(), *topic_id, *partition);
                    if t.group_offsets.get(key)?.is_none() {
                        t.group_offsets.insert(key, *offset)?;
                        fx.committed
                            .push((group.clone(), *topic_id, *partition, *offset));
                    }
                }
                Ok(WriteOutcome::OffsetsCommitted)
            }
            Command::StoreHalf {
                topic,
                producer_group,
                halves,
                created_at_ms,
                first_check_at_ms,
                producer,
            } => {
                let admitted = match producer {
                    Some(claim) => admit_claim(t, claim)?,
                    None => Ok(None),
                };
                let Some(live) = self.live(topic, fx, scope) else {
                    return Ok(Err(WriteError::UnknownTopic(topic.name.clone())));
                };
                if let Err(e) = partitions_exist(&live, halves.iter().map(|h| h.0)) {
                    Err(e)
                } else if let Err(e) = admitted {
                    Err(e)
                } else if let Ok(Some(reply)) = admitted {
                    Ok(WriteOutcome::Repeated(reply))
                } else {
                    let topic = &live;
                    let mut ids = Vec::with_capacity(halves.len());
                    for (partition, message) in halves.iter() {
                        let tx_id = fx.counters.next_tx_id;
                        fx.counters.next_tx_id += 1;
                        let sequence = fx.counters.take_sequences(1);
                        let record = HalfRecord {
                            producer_group: producer_group.clone(),
                            topic_id: topic.id(),
                            topic: topic.name.clone(),
                            partition: *partition,
                            message_sequence: sequence,
                            created_at_ms: *created_at_ms,
                            check_count: 0,
                            next_check_at_ms: *first_check_at_ms,
                            discarded: false,
                            message: message.clone(),
                        };
                        t.halves.insert(tx_id, encode(&record).as_slice())?;
                        fx.schedule.push(ScheduleChange::Upsert(
                            tx_id,
                            PendingTx {
                                producer_group: producer_group.clone(),
                                check_count: 0,
                                next_check_at_ms: *first_check_at_ms,
                            },
                        ));
                        ids.push((tx_id, sequence));
                    }
                    if let Some(claim) = producer {
                        let stored = ids
                            .iter()
                            .zip(halves.iter())
                            .map(|(&(tx_id, sequence), (partition, _))| {
                                (tx_id, sequence, *partition)
                            })
                            .collect();
                        remember_claim(t, claim, StoredReply::HalfStored(stored))?;
                    }
                    Ok(WriteOutcome::HalfStored(ids))
                }
            }
            Command::InitProducer {
                producer_id,
                principal,
                now_ms,
                idle_expiry_ms,
                producers_max,
            } => init_producer(
                t,
                *producer_id,
                principal,
                *now_ms,
                *idle_expiry_ms,
                *producers_max,
            )?,
            Command::ExpireProducers {
                now_ms,
                idle_expiry_ms,
            } => Ok(WriteOutcome::ProducersExpired(expire_producers(
                t,
                *now_ms,
                *idle_expiry_ms,
            )?)),
            Command::EndTransaction {
                tx_id,
                producer_group,
                commit,
                source,
                now_ms,
            } => self.end_transaction(
                t,
                fx,
                scope,
                *tx_id,
                producer_group.as_deref(),
                *commit,
                *source,
                *now_ms,
            )?,
            Command::CountCheck {
                tx_id,
                next_check_at_ms,
            } => match load_half(t, *tx_id)? {
                Err(e) => Err(e),
                Ok(Some(mut record)) => {
                    if record.discarded {
                        Ok(WriteOutcome::CheckCounted(None))
                    } else {
                        record.check_count += 1;
                        record.next_check_at_ms = *next_check_at_ms;
                        t.halves.insert(*tx_id, encode(&record).as_slice())?;
                        fx.schedule.push(ScheduleChange::Upsert(
                            *tx_id,
                            PendingTx {
                                producer_group: record.producer_group.clone(),
                                check_count: record.check_count,
                                next_check_at_ms: *next_check_at_ms,
                            },
                        ));
                        Ok(WriteOutcome::CheckCounted(Some(record.check_count)))
                    }
                }
                Ok(None) => Ok(WriteOutcome::CheckCounted(None)),
            },
            Command::Discard { tx_id, now_ms } => match load_half(t, *tx_id)? {
                Err(e) => Err(e),
                Ok(Some(mut record)) => {
                    if record.discarded {
                        Ok(WriteOutcome::Discarded(false))
                    } else {
                        record.discarded = true;
                        t.halves.insert(*tx_id, encode(&record).as_slice())?;
                        let outcome = OutcomeRecord {
                            outcome: TxOutcome::Discarded {
                                checks: record.check_count,
                            },
                            resolved_at_ms: *now_ms,
                            producer_group: record.producer_group.clone(),
                        };
                        t.outcomes.insert(*tx_id, encode(&outcome).as_slice())?;
                        fx.schedule.push(ScheduleChange::Remove(*tx_id));
                        Ok(WriteOutcome::Discarded(true))
                    }
                }
                Ok(None) => Ok(WriteOutcome::Discarded(false)),
            },
            Command::Resume {
                tx_id,
                next_check_at_ms,
            } => match load_half(t, *tx_id)? {
                Err(e) => Err(e),
                Ok(Some(mut record)) => {
                    if !record.discarded {
                        Err(WriteError::TransactionResolved {
                            tx_id: *tx_id,
                            reason: "is pending, not discarded: nothing to resume".into(),
                        })
                    } else {
                        record.discarded = false;
                        record.check_count = 0;
                        record.next_check_at_ms = *next_check_at_ms;
                        t.halves.insert(*tx_id, encode(&record).as_slice())?;
                        t.outcomes.remove(*tx_id)?;
                        fx.schedule.push(ScheduleChange::Upsert(
                            *tx_id,
                            PendingTx {
                                producer_group: record.producer_group,
                                check_count: 0,
                                next_check_at_ms: *next_check_at_ms,
                            },
                        ));
                        Ok(WriteOutcome::Resumed)
                    }
                }
                Ok(None) => Err(WriteError::UnknownTransaction(*tx_id)),
            },
            Command::Settle {
                group,
                retry_puts,
                retry_deletes,
                dead_letters,
                now_ms,
            } => {
                // Check first: a refused op must change nothing.
                if let Some((topic, _)) = dead_letters
                    .iter()
                    .find(|(t, _)| self.live(t, fx, scope).is_none())
                {
                    return Ok(Err(WriteError::UnknownTopic(topic.name.clone())));
                }
                for (key, record) in retry_puts.iter() {
                    t.retries.insert(
                        (group.as_str(), key.0, key.1, key.2),
                        encode(record).as_slice(),
                    )?;
                }
                for key in retry_deletes.iter() {
                    t.retries.remove((group.as_str(), key.0, key.1, key.2))?;
                }
                for (topic, message) in dead_letters.iter() {
                    let topic = self.live(topic, fx, scope).expect("checked above");
                    self.append_dead_letter(t, fx, &topic, message, *now_ms)?;
                }
                Ok(WriteOutcome::Settled)
            }
            Command::PluginPut { record, component } => {
                if let Some(bytes) = component {
                    t.plugin_components
                        .insert(record.component_sha256.as_str(), bytes.as_slice())?;
                }
                t.plugins
                    .insert(record.spec.name.as_str(), encode(&**record).as_slice())?;
                Self::drop_unused_components(t)?;
                Ok(WriteOutcome::PluginStored)
            }
            Command::PluginSetPaused {
                name,
                incarnation,
                paused,
            } => {
                let stored = match t.plugins.get(name.as_str())? {
                    Some(v) => Some(decode::<crate::command::PluginRecord>(
                        v.value(),
                        "plugin record",
                    )?),
                    None => None,
                };
                match stored {
                    Some(mut record) if record.incarnation == *incarnation => {
                        record.paused = paused.clone();
                        t.plugins
                            .insert(name.as_str(), encode(&record).as_slice())?;
                        Ok(WriteOutcome::PluginStored)
                    }
                    _ => Err(WriteError::PluginGone(name.clone())),
                }
            }
            Command::PluginRemove { name, group } => {
                let existed = t.plugins.remove(name.as_str())?.is_some();
                let plugin = name.as_str();
                t.plugin_state.retain_in(
                    (plugin, &[][..])..(plugin_successor(plugin).as_str(), &[][..]),
                    |_, _| false,
                )?;
                t.plugin_retries.retain_in(
                    (plugin, 0, 0, 0)..=(plugin, u32::MAX, u32::MAX, u64::MAX),
                    |_, _| false,
                )?;
                t.group_offsets.retain_in(
                    (group.as_str(), 0, 0)..=(group.as_str(), u32::MAX, u32::MAX),
                    |_, _| false,
                )?;
                Self::drop_unused_components(t)?;
                fx.forgotten_groups.push(group.clone());
                Ok(WriteOutcome::PluginRemoved(existed))
            }
            Command::PluginCommit(c) => self.plugin_commit(c, t, fx, scope)?,
            Command::Trim {
                topic,
                partition,
                before,
                batches_max,
            } => match self.live(topic, fx, scope) {
                None => Err(WriteError::UnknownTopic(topic.name.clone())),
                Some(live) => match partitions_exist(&live, [*partition]) {
                    Err(e) => Err(e),
                    Ok(()) => Ok(self.trim(t, fx, &live, *partition, *before, *batches_max)?),
                },
            },
            Command::SetRetention { topic, retention } => {
                if self.live(topic, fx, scope).is_none() {
                    Err(WriteError::UnknownTopic(topic.name.clone()))
                } else {
                    match retention {
                        Some(r) => t.retention.insert(topic.id, *r)?,
                        None => t.retention.remove(topic.id)?,
                    };
                    Ok(WriteOutcome::RetentionSet)
                }
            }
            Command::PutToken { id, record } => {
                let existed = match record {
                    Some(r) => t
                        .tokens
                        .insert(id.as_str(), encode(r).as_slice())?
                        .is_some(),
                    None => t.tokens.remove(id.as_str())?.is_some(),
                };
                Ok(WriteOutcome::TokenStored(existed))
            }
            Command::SetAcl { principal, rules } => {
                if rules.is_empty() {
                    t.acls.remove(principal.as_str())?;
                } else {
                    t.acls
                        .insert(principal.as_str(), encode(rules).as_slice())?;
                }
                Ok(WriteOutcome::AclSet)
            }
            Command::SetPolicy { group, policy } => {
                t.policies
                    .insert(group.as_str(), encode(policy).as_slice())?;
                Ok(WriteOutcome::PolicySet)
            }
            Command::PruneOutcomes {
                resolved_before_ms,
                rows_max,
            } => {
                // Outcomes are pruned in transaction-id order and pruning stops
                // at the first one still inside the retention window, so one
                // long-lived transaction holds back the ids after it:
                // retention is a lower bound.
                let mut pruned = 0u64;
                while pruned < *rows_max {
                    let first = t
                        .outcomes
                        .first()?
                        .map(|(k, v)| (k.value(), v.value().to_vec()));
                    let Some((tx_id, bytes)) = first else { break };
                    // An outcome that no longer decodes answers nothing: prune it.
                    if let Ok(record) = decode::<OutcomeRecord>(&bytes, "transaction outcome") {
                        if record.resolved_at_ms >= *resolved_before_ms {
                            break;
                        }
                    }
                    t.outcomes.remove(tx_id)?;
                    pruned += 1;
                }
                Ok(WriteOutcome::Pruned(pruned))
            }
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn end_transaction(
        &self,
        t: &mut Tables,
        fx: &mut Effects,
        scope: &Scope,
        tx_id: u64,
        requester: Option<&str>,
        commit: bool,
        source: TxSource,
        now_ms: u64,
    ) -> Result<Result<WriteOutcome, WriteError>, StorageError> {
        let half = t.halves.get(tx_id)?.map(|v| v.value().to_vec());
        let Some(bytes) = half else {
            // Already resolved: answer consistently from the outcome.
            let outcome = t.outcomes.get(tx_id)?.map(|v| v.value().to_vec());
            let Some(bytes) = outcome else {
                return Ok(Err(WriteError::UnknownTransaction(tx_id)));
            };
            let record: OutcomeRecord = match decode(&bytes, "transaction outcome") {
                Ok(r) => r,
                Err(e) => return Ok(Err(WriteError::Corrupt(e.to_string()))),
            };
            if let Some(e) = wrong_group(tx_id, requester, &record.producer_group) {
                return Ok(Err(e));
            }
            return Ok(match (record.outcome, commit) {
                (
                    TxOutcome::Committed {
                        partition,
                        offset,
                        message_sequence,
                    },
                    true,
                ) => Ok(WriteOutcome::TxCommitted(Landed {
                    partition,
                    offset,
                    sequence: message_sequence,
                })),
                (TxOutcome::Committed { .. }, false) => Err(WriteError::TransactionResolved {
                    tx_id,
                    reason: "was committed; it cannot be rolled back".into(),
                }),
                (TxOutcome::RolledBack, false) => Ok(WriteOutcome::TxRolledBack),
                (TxOutcome::RolledBack, true) => Err(WriteError::TransactionResolved {
                    tx_id,
                    reason: "was rolled back; it cannot be committed".into(),
                }),
                (TxOutcome::Discarded { .. }, _) => unreachable_discarded(tx_id),
            });
        };
        let record: HalfRecord = match decode(&bytes, "half message") {
            Ok(r) => r,
            Err(e) => return Ok(Err(WriteError::Corrupt(e.to_string()))),
        };
        if let Some(e) = wrong_group(tx_id, requester, &record.producer_group) {
            return Ok(Err(e));
        }
        if source == TxSource::Operator && !record.discarded {
            return Ok(Err(WriteError::TransactionResolved {
                tx_id,
                reason: "is pending, not discarded: its producer decides".into(),
            }));
        }
        if record.discarded && source != TxSource::Operator {
            // Discarded means rolled back: a rollback agrees, a commit conflicts.
            return Ok(if commit {
                Err(WriteError::TransactionResolved {
                    tx_id,
                    reason: format!(
                        "was discarded (rolled back) after {} unanswered checks; an operator can resume or commit it",
                        record.check_count
                    ),
                })
            } else {
                Ok(WriteOutcome::TxRolledBack)
            });
        }
        t.halves.remove(tx_id)?;
        fx.schedule.push(ScheduleChange::Remove(tx_id));
        let named = TopicRef {
            id: record.topic_id,
            name: record.topic.clone(),
        };
        let topic = self
            .live(&named, fx, scope)
            .filter(|topic| record.partition < topic.partition_count());
        let (outcome, result) = match (commit, topic) {
            (true, Some(topic)) => {
                let mut value = batch::encode(now_ms, &[&record.message]);
                batch::set_base_sequence(&mut value, record.message_sequence);
                let keys = super::key_hashes([&record.message]);
                let offset = self.append(t, fx, &topic, record.partition, 1, &value, &keys)?;
                let landed = Landed {
                    partition: record.partition,
                    offset,
                    sequence: record.message_sequence,
                };
                (
                    TxOutcome::Committed {
                        partition: record.partition,
                        offset,
                        message_sequence: record.message_sequence,
                    },
                    Ok(WriteOutcome::TxCommitted(landed)),
                )
            }
            (true, None) => (
                TxOutcome::RolledBack,
                Err(WriteError::UnknownTopic(record.topic.clone())),
            ),
            (false, _) => (TxOutcome::RolledBack, Ok(WriteOutcome::TxRolledBack)),
        };
        let outcome = OutcomeRecord {
            outcome,
            resolved_at_ms: now_ms,
            producer_group: record.producer_group,
        };
        t.outcomes.insert(tx_id, encode(&outcome).as_slice())?;
        Ok(result)
    }
}

/// The error when a producer group decides another group's transaction.
fn wrong_group(tx_id: u64, requester: Option<&str>, owner: &str) -> Option<WriteError> {
    requester
        .filter(|r| *r != owner)
        .map(|r| WriteError::WrongProducerGroup {
            tx_id,
            owner: owner.to_string(),
            requester: r.to_string(),
        })
}

/// A stored half message; a record that does not decode fails only the
/// request that touched it.
#[allow(clippy::type_complexity)]
fn load_half(
    t: &Tables,
    tx_id: u64,
) -> Result<Result<Option<HalfRecord>, WriteError>, StorageError> {
    let Some(bytes) = t.halves.get(tx_id)?.map(|v| v.value().to_vec()) else {
        return Ok(Ok(None));
    };
    Ok(decode(&bytes, "half message")
        .map(Some)
        .map_err(|e| WriteError::Corrupt(e.to_string())))
}

/// A discarded transaction keeps its half record, so its outcome is never
/// consulted without one; answer as a conflict rather than panic.
fn unreachable_discarded(tx_id: u64) -> Result<WriteOutcome, WriteError> {
    Err(WriteError::TransactionResolved {
        tx_id,
        reason: "was discarded".into(),
    })
}

/// Names and ids created or deleted earlier in the same transaction.
/// Count what a committed request did that metrics report: dead letters and
/// plugin retries (only after the commit, so a failed one counts nothing).
/// The producer's verdict on a claim: `Ok(None)` to store it, `Ok(Some)`
/// for a repeat, `Err` to refuse it. The outer error is storage's.
fn admit_claim(
    t: &Tables<'_>,
    claim: &Claim,
) -> Result<Result<Option<StoredReply>, WriteError>, StorageError> {
    let record = read_producer(t, claim.producer_id)?;
    Ok(match producers::admit(record.as_ref(), claim) {
        Ok(Admission::New) => Ok(None),
        Ok(Admission::Repeat(reply)) => Ok(Some(reply)),
        Err(e) => Err(WriteError::Producer(e)),
    })
}

/// Record a stored request in its producer's record (admitted just before,
/// in the same transaction, so the record is there).
fn remember_claim(
    t: &mut Tables<'_>,
    claim: &Claim,
    reply: StoredReply,
) -> Result<(), StorageError> {
    let Some(mut record) = read_producer(t, claim.producer_id)? else {
        return Err(StorageError::Corrupt(format!(
            "producer {} vanished within a transaction",
            claim.producer_id
        )));
    };
    record.remember(claim, reply);
    t.producers
        .insert(claim.producer_id, encode(&record).as_slice())?;
    Ok(())
}

fn read_producer(t: &Tables<'_>, producer_id: u64) -> Result<Option<ProducerRecord>, StorageError> {
    match t.producers.get(producer_id)? {
        Some(v) => Ok(Some(decode(v.value(), "producer record")?)),
        None => Ok(None),
    }
}

fn init_producer(
    t: &mut Tables<'_>,
    producer_id: Option<u64>,
    principal: &str,
    now_ms: u64,
    idle_expiry_ms: u64,
    producers_max: u32,
) -> Result<Result<WriteOutcome, WriteError>, StorageError> {
    if let Some(id) = producer_id {
        let mut record = match read_producer(t, id)? {
            Some(r) if !r.is_expired(now_ms, idle_expiry_ms) => r,
            _ => return Ok(Err(ProducerError::Unknown(id).into())),
        };
        if record.principal != principal {
            return Ok(Err(ProducerError::NotYours(id).into()));
        }
        record.bump_epoch(now_ms);
        t.producers.insert(id, encode(&record).as_slice())?;
        return Ok(Ok(WriteOutcome::ProducerInit(id, record.epoch)));
    }
    if t.producers.len()? >= producers_max as u64
        && (expire_producers(t, now_ms, idle_expiry_ms)? == 0
            || t.producers.len()? >= producers_max as u64)
    {
        return Ok(Err(WriteError::ProducersFull(producers_max)));
    }
    let id = t
        .meta
        .get(tables::META_NEXT_PRODUCER_ID)?
        .map_or(1, |v| v.value());
    t.meta.insert(tables::META_NEXT_PRODUCER_ID, id + 1)?;
    let record = ProducerRecord::new(principal.to_string(), now_ms);
    t.producers.insert(id, encode(&record).as_slice())?;
    Ok(Ok(WriteOutcome::ProducerInit(id, record.epoch)))
}

/// Remove the producer records idle past the expiry; how many went.
fn expire_producers(
    t: &mut Tables<'_>,
    now_ms: u64,
    idle_expiry_ms: u64,
) -> Result<u64, StorageError> {
    let mut idle = Vec::new();
    for entry in t.producers.iter()? {
        let (id, value) = entry?;
        let record: ProducerRecord = decode(value.value(), "producer record")?;
        if record.is_expired(now_ms, idle_expiry_ms) {
            idle.push(id.value());
        }
    }
    for id in &idle {
        t.producers.remove(id)?;
    }
    Ok(idle.len() as u64)
}

/// Refuse partitions a topic does not have (a command from a replay or a
/// peer is not trusted to have been checked by a handler).
fn partitions_exist(
    topic: &Topic,
    partitions: impl IntoIterator<Item = u32>,
) -> Result<(), WriteError> {
    let count = topic.partition_count();
    match partitions.into_iter().find(|p| *p >= count) {
        Some(p) => Err(WriteError::Invalid(format!(
            "topic {:?} has {count} partitions; there is no partition {p}",
            topic.name
        ))),
        None => Ok(()),
    }
}

fn count_settled(observer: &dyn super::StorageObserver, op: &Op) {
    match op {
        Op::Command(Command::Settle { dead_letters, .. }) => {
            observer.settled(dead_letters.len() as u64, 0)
        }
        Op::Command(Command::PluginCommit(c)) => {
            observer.settled(c.dead_letters.len() as u64, c.retry_puts.len() as u64)
        }
        _ => {}
    }
}

/// The smallest string greater than every `(name, …)` key of `name`: the
/// name with a NUL appended (names never contain NUL).
fn plugin_successor(name: &str) -> String {
    format!("{name}\0")
}

#[derive(Default)]
struct Scope {
    /// Topics deleted by this transaction so far.
    deleted: HashSet<u32>,
}
