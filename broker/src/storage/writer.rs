//! The single storage writer: group commit.
//!
//! One OS thread owns every redb write transaction. It blocks for the first
//! queued request, drains whatever else is queued (up to
//! `commit_bytes_max`), applies it all in one transaction, appends the
//! commit's frame to the command log (`frames`: its batches and its
//! commands) and fdatasyncs it, commits redb (without an fsync except at
//! checkpoints), and only then updates the in-memory state (topics,
//! offsets, the transaction schedule) and answers each request. At start-up
//! and after reopening the database it applies the frames past the last
//! checkpoint again (`replay`).
//!
//! Invariants: offsets, message-id sequences, topic ids and transaction ids
//! are assigned here and nowhere else; a failed commit answers every request
//! in it with an error and changes no in-memory state, and the next commit
//! is a checkpoint; a request is answered only after its frame is synced
//! (`durability = immediate`).
//!
//! Layout: this file is the group commit (queue, effects made visible after
//! the commit, the apply loop, the command recording); each command family
//! is applied in its own module: `log` (topics, appends, schedule, trims,
//! segment writes), `groups`, `transactions`, `producer_claims`, `plugins`,
//! `access`. Size: about 980 lines, over the 600 guideline, because the
//! commit path (answer early for a test fault, recover after an I/O error,
//! record, frame, checkpoint, publish effects, apply frames again) reads
//! best in one place.

use super::segments::{Roll, SegmentAppender, SegmentReaper, Segments};
use super::{batch, tables, Durability, StorageError, StoreOptions};
use crate::command::{Command, PartitionAppend, PluginCommit, TopicRef};
use crate::producers::{
    self, Admission, Claim, Placement, ProducerError, ProducerRecord, StoredReply,
};
use crate::topics::{Topic, TopicMeta, TopicRegistry};
use crate::transactions::{HalfRecord, OutcomeRecord, PendingTx, TxOutcome, TxSchedule, TxSource};
use msmq_protocol::NewMessage;
use redb::{ReadableTable, ReadableTableMetadata};
mod access;
mod groups;
mod log;
mod plugins;
mod producer_claims;
mod recovery;
mod transactions;

use std::cell::{Cell, RefCell};
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
/// Test fault switch: abort the process after a commit's frame is written
/// and synced, before its redb commit (the restart applies the frame again).
pub const CRASH_BEFORE_INDEX_COMMIT: &str = "crash-before-index-commit";
/// Exit status of a broker that [`CRASH_BEFORE_INDEX_COMMIT`] stopped.
const TEST_CRASH_EXIT_CODE: i32 = 86;
/// Test fault switch: cut the active segment file in the middle of the
/// frame just written and abort, as a crash mid-write leaves it.
pub const CRASH_MID_FRAME: &str = "crash-mid-frame";
/// A checkpoint (a durable redb commit: start-up applies the command log
/// again only past it) at least this often while commits go on. With
/// `durability = none` it is also when the segment files are synced, so a
/// crash loses at most about this much. A restart applies the frames since
/// the last one again, which adds to its downtime: at 1 s, 400 frames took
/// 155 ms, and delayed messages due meanwhile were late by that much more.
const CHECKPOINT_INTERVAL_MS: u64 = 250;
/// ... and at least once the log grew by this much since the last one, so
/// a restart applies at most this many bytes of frames again.
const CHECKPOINT_LOG_BYTES_MAX: u64 = 256 << 20;

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

struct Job {
    command: Command,
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
                command,
                reply: Some(reply),
            }))
            .await
            .map_err(|_| WriteError::ShuttingDown)?;
        rx.await.map_err(|_| WriteError::ShuttingDown)?
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
                    command,
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
    replay: super::segments::Replay,
) -> Result<WriterHandle, StorageError> {
    let (tx, rx) = mpsc::channel(QUEUE_REQUESTS_MAX);
    let mut writer = Writer::new(
        db,
        segments,
        State {
            registry,
            schedule,
            next_scheduled_ms,
            counters,
        },
        options,
    );
    writer.fault_switches = fault_switches;
    writer.recorder = recorder;
    writer.replay(replay)?;
    std::thread::Builder::new()
        .name("msmq-writer".into())
        .spawn(move || writer.run(rx))
        .expect("spawning the writer thread");
    Ok(WriterHandle { tx })
}

/// The in-memory state a writer keeps current.
struct State {
    registry: Arc<TopicRegistry>,
    schedule: Arc<Mutex<TxSchedule>>,
    next_scheduled_ms: Arc<AtomicU64>,
    counters: Counters,
}

impl Writer {
    fn new(
        db: Arc<super::db::Db>,
        segments: Arc<Segments>,
        state: State,
        options: StoreOptions,
    ) -> Writer {
        Writer {
            db,
            fault_switches: None,
            appender: RefCell::new(
                SegmentAppender::new(segments.clone()).with_prefill(options.segment_prefill),
            ),
            reaper: RefCell::new(SegmentReaper::new(segments)),
            registry: state.registry,
            schedule: state.schedule,
            next_scheduled_ms: state.next_scheduled_ms,
            options,
            counters: state.counters,
            recorder: None,
            last_checkpoint: Instant::now(),
            log_bytes_since_checkpoint: 0,
            checkpoint_due: false,
            command_index: Cell::new(0),
            origin: Cell::new(None),
            redb_commit_attempted: false,
            recovering: None,
        }
    }
}

struct Writer {
    db: Arc<super::db::Db>,
    /// For tests: the directory of fault switch files.
    fault_switches: Option<std::path::PathBuf>,
    /// Appends each committed batch to the active segment file.
    appender: RefCell<SegmentAppender>,
    reaper: RefCell<SegmentReaper>,
    registry: Arc<TopicRegistry>,
    schedule: Arc<Mutex<TxSchedule>>,
    next_scheduled_ms: Arc<AtomicU64>,
    options: StoreOptions,
    counters: Counters,
    /// Where applied commands are recorded, when `record_commands` is set.
    recorder: Option<super::recording::Recorder>,
    last_checkpoint: Instant,
    /// Frame bytes appended since the last checkpoint.
    log_bytes_since_checkpoint: u64,
    /// The next commit is a checkpoint (after a failed commit, so the
    /// failed frame's file is closed durably before anything else commits).
    checkpoint_due: bool,
    /// Index, in the commit, of the command being applied; and the origin
    /// of the batch about to be appended (see `frames::Origin`).
    command_index: Cell<u32>,
    origin: Cell<super::frames::Origin>,
    /// The failing commit got as far as redb's commit (which may then have
    /// reached the disk after all).
    redb_commit_attempted: bool,
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
    /// Bytes of the commit's frame.
    log_bytes: u64,
    /// The commit was a checkpoint.
    checkpoint: bool,
}

/// The tables of one write transaction.
struct Tables<'t> {
    log: redb::Table<'t, (u32, u32, u64), &'static [u8]>,
    log_files: redb::Table<'t, u64, u64>,
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
                        bytes += job.command.bytes();
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
        // A clean stop leaves nothing to apply again at start-up, and
        // records where files a failed commit abandoned end.
        if self.recovering.is_none()
            && (self.log_bytes_since_checkpoint > 0
                || self.checkpoint_due
                || self.appender.borrow().has_rows())
        {
            if let Err(e) = self.checkpoint() {
                tracing::warn!(error = %e, "the checkpoint at shutdown failed; start-up applies the log again");
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
        let bytes: usize = jobs.iter().map(|j| j.command.bytes()).sum();
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
        let mut commands: Vec<&mut Command> = jobs.iter_mut().map(|j| &mut j.command).collect();
        let applied = self.apply(&mut commands, &mut answer_early);
        {
            let mut appender = self.appender.borrow_mut();
            let mut reaper = self.reaper.borrow_mut();
            match &applied {
                Ok(_) => {
                    appender.committed();
                    reaper.committed();
                }
                Err(_) => {
                    appender.abandon_all(!self.redb_commit_attempted);
                    reaper.failed();
                }
            }
        }
        match applied {
            Ok((results, effects)) => {
                self.publish(effects);
                let observer = &self.options.observer;
                for (job, result) in jobs.into_iter().zip(results) {
                    if result.is_ok() {
                        count_settled(observer.as_ref(), &job.command);
                    }
                    if let Some(reply) = job.reply {
                        let _ = reply.send(result);
                    }
                }
                tracing::trace!(requests = count, elapsed = ?started.elapsed(), "group commit");
                self.appender
                    .borrow_mut()
                    .note_commit(started.elapsed(), bytes as u64);
                observer.group_committed(count, bytes, started.elapsed());
            }
            Err(e) => {
                tracing::error!(error = %e, requests = count, "commit failed; refusing its requests");
                // The next commit closes the failed frame's file durably.
                self.checkpoint_due = true;
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

    /// Make a committed transaction's effects visible in memory.
    fn publish(&mut self, effects: Effects) {
        {
            {
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
            }
        }
    }

    /// Apply again the command log's frames past the last checkpoint (at
    /// start-up, and after reopening the database), publishing their effects,
    /// then checkpoint. Nothing is written to the segment files.
    pub(super) fn replay(&mut self, replay: super::segments::Replay) -> Result<(), StorageError> {
        if replay.frames.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let count = replay.frames.len();
        let segments = self.appender.borrow().segments().clone();
        self.appender.borrow_mut().start_replay(replay.from);
        let mut open: Option<(u64, std::fs::File)> = None;
        for at in replay.frames {
            if open.as_ref().is_none_or(|(n, _)| *n != at.file) {
                let path = segments.path(at.file);
                let file = std::fs::File::open(&path)
                    .map_err(|e| StorageError::Redb(format!("opening {}: {e}", path.display())))?;
                open = Some((at.file, file));
            }
            let (_, file) = open.as_ref().expect("opened");
            let frame = super::frames::read(file, &at)?;
            let mut commands = frame.commands;
            self.appender
                .borrow_mut()
                .replay_frame(at.file, at.end(), frame.values);
            let mut refs: Vec<&mut Command> = commands.iter_mut().collect();
            let applied = self.apply(&mut refs, &mut |_| {});
            match applied {
                Ok((results, effects)) => {
                    for refused in results.iter().filter_map(|r| r.as_ref().err()) {
                        // As when the frame was written: refusals repeat.
                        tracing::warn!(index = at.header.applied_index, error = %refused, "a command applied again was refused");
                    }
                    self.appender.borrow_mut().committed();
                    self.reaper.borrow_mut().committed();
                    self.publish(effects);
                }
                Err(e) => {
                    self.appender.borrow_mut().abandon_all(false);
                    self.reaper.borrow_mut().failed();
                    return Err(e);
                }
            }
            if self.counters.applied_index != at.header.applied_index {
                return Err(StorageError::Corrupt(format!(
                    "applying frame {} again reached applied index {}",
                    at.header.applied_index, self.counters.applied_index
                )));
            }
        }
        self.appender.borrow_mut().finish_replay();
        self.checkpoint()?;
        tracing::info!(frames = count, elapsed = ?started.elapsed(), "applied the command log past the checkpoint again");
        Ok(())
    }

    /// A durable commit that applies no command: names files the appender
    /// started or closed meanwhile, and makes every commit before it durable.
    fn checkpoint(&mut self) -> Result<(), StorageError> {
        let synced = self.appender.borrow_mut().sync()?;
        self.options.observer.segments_synced(synced);
        let txn = self.db.begin_write()?;
        {
            let mut files = txn.open_table(tables::LOG_FILES)?;
            for (number, length) in self.appender.borrow_mut().take_rows() {
                files.insert(number, length)?;
            }
        }
        txn.commit()?;
        self.appender.borrow_mut().committed();
        self.last_checkpoint = Instant::now();
        self.log_bytes_since_checkpoint = 0;
        self.checkpoint_due = false;
        Ok(())
    }

    #[allow(clippy::type_complexity)]
    fn apply(
        &mut self,
        commands: &mut [&mut Command],
        before_commit: &mut dyn FnMut(&[Result<WriteOutcome, WriteError>]),
    ) -> Result<(Vec<Result<WriteOutcome, WriteError>>, Effects), StorageError> {
        self.redb_commit_attempted = false;
        // A batch's origin is set just before its append; none is left over
        // from a commit that failed in between.
        self.origin.set(None);
        let mut txn = self.db.begin_write()?;
        // The frame is the commit point; redb, the applied state, is made
        // durable only at checkpoints.
        let mut checkpoint = self.checkpoint_due
            || self.last_checkpoint.elapsed() >= Duration::from_millis(CHECKPOINT_INTERVAL_MS)
            || self.log_bytes_since_checkpoint >= CHECKPOINT_LOG_BYTES_MAX;
        if !checkpoint {
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
            log_bytes: 0,
            checkpoint: false,
        };
        // Recorded as submitted: applying fills in message-id sequences.
        let recorded = match &self.recorder {
            Some(_) => {
                let refs: Vec<&Command> = commands.iter().map(|c| &**c).collect();
                (!refs.is_empty()).then(|| crate::command::encode_refs(&refs))
            }
            None => None,
        };
        if !commands.is_empty() {
            fx.counters.applied_index += 1;
        }
        // The frame's meta: the commands as submitted, without the batches
        // the frame holds as values.
        let stripped = super::frames::encode_stripped(commands);
        let mut results = Vec::with_capacity(commands.len());
        {
            let mut t = Tables {
                log: txn.open_table(tables::LOG)?,
                log_files: txn.open_table(tables::LOG_FILES)?,
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
            for (index, command) in commands.iter_mut().enumerate() {
                self.command_index.set(index as u32);
                results.push(self.apply_one(command, &mut t, &mut fx, &mut scope)?);
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
            // The broken broker of the `ack-before-commit` fault answers
            // while the frame is still only in memory.
            before_commit(&results);
            let frame_bytes = self.write_segments(&mut t, fx.counters.applied_index, &stripped)?;
            fx.log_bytes = frame_bytes;
        }
        // Delete files only after a durable commit: a commit redb never
        // persisted would come back naming them.
        if !checkpoint && self.reaper.borrow().deletes_files() {
            checkpoint = true;
            txn.set_durability(redb::Durability::Immediate)
                .map_err(|e| StorageError::Redb(e.to_string()))?;
        }
        fx.checkpoint = checkpoint;
        // The crash faults strike commits that appended to a log.
        let appended = !fx.ends.is_empty();
        if appended && self.fault_on(CRASH_MID_FRAME) {
            self.appender.borrow_mut().tear_last_frame()?;
            tracing::error!("test fault: crash in the middle of writing a frame");
            std::process::exit(TEST_CRASH_EXIT_CODE);
        }
        if checkpoint || self.options.durability == Durability::Immediate {
            // The frame is durable before redb's commit, and acknowledged
            // only once durable.
            let synced = self.appender.borrow_mut().sync()?;
            self.options.observer.segments_synced(synced);
            if appended && self.fault_on(CRASH_BEFORE_INDEX_COMMIT) && synced > 0 {
                tracing::error!("test fault: crash between the segment write and the index commit");
                std::process::exit(TEST_CRASH_EXIT_CODE);
            }
        }
        if let (Some(recorder), Some(encoded)) = (&mut self.recorder, &recorded) {
            if let Err(e) = recorder.append(fx.counters.applied_index, encoded) {
                // Nothing commits: cut off whatever part of the frame was written.
                recorder.failed();
                return Err(e);
            }
        }
        self.redb_commit_attempted = true;
        let committed = txn.commit();
        if let Some(recorder) = &mut self.recorder {
            match (&committed, &recorded) {
                (Ok(()), Some(_)) => recorder.committed(),
                (Err(_), Some(_)) => recorder.failed(),
                _ => {}
            }
        }
        committed?;
        if checkpoint {
            self.last_checkpoint = Instant::now();
            self.log_bytes_since_checkpoint = 0;
            self.checkpoint_due = false;
        } else {
            self.log_bytes_since_checkpoint += fx.log_bytes;
        }
        Ok((results, fx))
    }

    /// Close this commit's frame (its meta: the commands as submitted,
    /// `stripped` of their batches), write it to the active segment file,
    /// name files started or closed in `log_files`, and record where the
    /// frame ends. Returns the frame's bytes.
    fn write_segments(
        &self,
        t: &mut Tables,
        applied_index: u64,
        stripped: &[u8],
    ) -> Result<u64, StorageError> {
        let mut appender = self.appender.borrow_mut();
        let (file, end) = appender.finish_frame(applied_index, stripped)?;
        t.meta.insert(tables::META_LOG_FILE, file)?;
        t.meta.insert(tables::META_LOG_END, end)?;
        appender.write()?;
        let written = appender.take_written();
        for (number, length) in appender.take_rows() {
            t.log_files.insert(number, length)?;
        }
        self.reaper.borrow_mut().collect(
            &t.log,
            &t.partitions,
            &mut t.log_files,
            appender.first_live_number(),
        )?;
        if written > 0 {
            self.options.observer.segments_written(written);
        }
        Ok(written)
    }

    /// The segment roll of a topic: its own retention's, or the default's.
    fn roll(&self, t: &Tables, topic: u32) -> Roll {
        let (age_ms, max_bytes) = t
            .retention
            .get(topic)
            .ok()
            .flatten()
            .map(|v| v.value())
            .unwrap_or(self.options.retention_default);
        Roll::for_retention(self.options.segment_roll_max, age_ms, max_bytes)
    }

    /// Whether a test fault switch is on.
    fn fault_on(&self, switch: &str) -> bool {
        self.fault_switches
            .as_ref()
            .is_some_and(|dir| dir.join(switch).exists())
    }

    fn apply_one(
        &self,
        command: &mut Command,
        t: &mut Tables,
        fx: &mut Effects,
        scope: &mut Scope,
    ) -> Result<Result<WriteOutcome, WriteError>, StorageError> {
        Ok(match command {
            Command::CreateTopic { .. }
            | Command::DeleteTopic { .. }
            | Command::Append { .. }
            | Command::ReleaseDue { .. }
            | Command::Trim { .. }
            | Command::SetRetention { .. } => self.apply_log(command, t, fx, scope)?,
            Command::CommitOffsets { .. }
            | Command::PinOffsets { .. }
            | Command::Settle { .. }
            | Command::SetPolicy { .. } => self.apply_groups(command, t, fx, scope)?,
            Command::StoreHalf { .. }
            | Command::EndTransaction { .. }
            | Command::CountCheck { .. }
            | Command::Discard { .. }
            | Command::Resume { .. }
            | Command::PruneOutcomes { .. } => self.apply_transaction(command, t, fx, scope)?,
            Command::InitProducer { .. } | Command::ExpireProducers { .. } => {
                self.apply_producers(command, t)?
            }
            Command::PluginPut { .. }
            | Command::PluginSetPaused { .. }
            | Command::PluginRemove { .. }
            | Command::PluginCommit(_) => self.apply_plugins(command, t, fx, scope)?,
            Command::PutToken { .. } | Command::SetAcl { .. } => self.apply_access(command, t)?,
        })
    }
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

/// A command handed to the wrong family's apply (a bug, refused rather
/// than a panic).
fn misrouted(command: &Command) -> WriteError {
    let name = format!("{command:?}");
    let kind = name.split([' ', '(', '{']).next().unwrap_or_default();
    WriteError::Invalid(format!("internal: {kind} reached the wrong apply"))
}

fn count_settled(observer: &dyn super::StorageObserver, command: &Command) {
    match command {
        Command::Settle { dead_letters, .. } => observer.settled(dead_letters.len() as u64, 0),
        Command::PluginCommit(c) => {
            observer.settled(c.dead_letters.len() as u64, c.retry_puts.len() as u64)
        }
        _ => {}
    }
}

#[derive(Default)]
struct Scope {
    /// Topics deleted by this transaction so far.
    deleted: HashSet<u32>,
}
