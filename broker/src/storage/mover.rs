//! The mover: a background thread that moves batches from the redb file to
//! the log's segment files.
//!
//! A produce commits its batch in redb alone: one fsync, as before segments
//! existed. Every `segment_move_interval` the mover reads the batches still
//! held in `log` rows (from a read snapshot, so it never blocks the writer),
//! appends them to their partitions' segments, fsyncs those, and only then
//! queues one [`LocalOp::MoveToSegments`] that turns the rows into pointers.
//! The copying and the segment fsync happen beside the writer, not in it.
//!
//! Invariants:
//! - A pointer reaches a commit only after the bytes it points at are
//!   durable, so a crash at any moment leaves every row either holding its
//!   batch or pointing at durable bytes.
//! - Batches of a partition go to its segments in offset order, so every
//!   batch of a segment is at or past the segment's base and below the next
//!   segment's base: what retention's whole-segment deletes rely on. When
//!   the writer refuses a segment that retention deleted mid-move, it also
//!   refuses the partition's later segments of that move, and the mover
//!   starts the partition over on a new segment from its oldest inline row.
//! - After a failed move the mover starts every partition on a new segment
//!   and looks at every partition from its start again.

use super::batch;
use super::segments::{Roll, SegmentAppender, Segments};
use super::tables;
use super::writer::{LocalOp, WriteOutcome, WriterHandle};
use crate::storage::ReadSource;
use crate::topics::TopicRegistry;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Most batch bytes one move carries, so a backlog moves in steps.
pub const SEGMENT_MOVE_BYTES_MAX: usize = 64 << 20;
/// The shortest `segment_move_interval`.
pub const SEGMENT_MOVE_INTERVAL_MIN: Duration = Duration::from_millis(10);
/// How often a sleeping mover looks at its stop flag.
const STOP_CHECK: Duration = Duration::from_millis(50);

pub(super) struct MoverSettings {
    pub interval: Duration,
    pub roll_max: Roll,
    /// (max age ms, max bytes) of topics without their own retention.
    pub retention_default: (u64, u64),
    pub observer: Arc<dyn super::StorageObserver>,
}

/// Stops the mover when dropped.
pub(super) struct MoverHandle {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MoverHandle {
    /// A handle to no mover.
    pub(super) fn stopped() -> MoverHandle {
        MoverHandle {
            stop: Arc::new(AtomicBool::new(true)),
            thread: None,
        }
    }

    /// Stop the mover and wait until its thread has ended (no segment
    /// write of it can follow).
    pub(super) fn stop_and_wait(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for MoverHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

pub(super) fn start(
    db: Arc<crate::storage::db::Db>,
    segments: Arc<Segments>,
    registry: Arc<TopicRegistry>,
    writer: WriterHandle,
    settings: MoverSettings,
) -> MoverHandle {
    let stop = Arc::new(AtomicBool::new(false));
    let mut mover = Mover {
        db,
        appender: SegmentAppender::new(segments),
        registry,
        writer,
        settings,
        cursors: HashMap::new(),
        failing: false,
    };
    let stopping = stop.clone();
    let thread = std::thread::Builder::new()
        .name("msmq-mover".into())
        .spawn(move || mover.run(&stopping))
        .expect("spawning the segment mover thread");
    MoverHandle {
        stop,
        thread: Some(thread),
    }
}

struct Mover {
    db: Arc<crate::storage::db::Db>,
    appender: SegmentAppender,
    registry: Arc<TopicRegistry>,
    writer: WriterHandle,
    settings: MoverSettings,
    /// (topic id, partition) → the offset below which every batch is
    /// already in a segment.
    cursors: HashMap<(u32, u32), u64>,
    /// The last move failed.
    failing: bool,
}

enum Step {
    /// Moved everything that was waiting.
    CaughtUp,
    /// Moved one step of a larger backlog.
    More,
    /// The writer is gone.
    Stopped,
}

impl Mover {
    fn run(&mut self, stop: &AtomicBool) {
        while !stop.load(Ordering::Acquire) {
            // A panic must not end the thread: batches would stay in redb
            // for good with nothing to say so.
            let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.move_once()))
                .unwrap_or_else(|_| Err("the segment mover panicked".to_string()));
            if self.failing && matches!(step, Ok(Step::More | Step::CaughtUp)) {
                self.failing = false;
                tracing::info!("moving batches to segment files works again");
            }
            match step {
                Ok(Step::More) => continue,
                Ok(Step::CaughtUp) => {}
                Ok(Step::Stopped) => break,
                Err(e) => {
                    self.failing = true;
                    tracing::warn!(error = %e, "moving batches to segment files failed; they stay in redb and the next move tries again");
                    self.appender.abandon_all();
                    self.cursors.clear();
                }
            }
            let mut slept = Duration::ZERO;
            while slept < self.settings.interval && !stop.load(Ordering::Acquire) {
                let nap = STOP_CHECK.min(self.settings.interval - slept);
                std::thread::sleep(nap);
                slept += nap;
            }
        }
        tracing::debug!("segment mover stopped");
    }

    fn move_once(&mut self) -> Result<Step, String> {
        let topics = self.registry.list();
        let live: std::collections::HashSet<u32> = topics.iter().map(|t| t.id()).collect();
        self.cursors.retain(|k, _| live.contains(&k.0));
        self.appender.retain_topics(|id| live.contains(&id));
        let mut moves = Vec::new();
        let mut bytes = 0usize;
        let mut full = false;
        {
            let txn = self.db.read_txn().map_err(|e| e.to_string())?;
            let log = txn.open_table(tables::LOG).map_err(|e| e.to_string())?;
            let retention = txn
                .open_table(tables::TOPIC_RETENTION)
                .map_err(|e| e.to_string())?;
            'topics: for topic in &topics {
                let id = topic.id();
                let roll = || {
                    let (age_ms, max_bytes) = retention
                        .get(id)
                        .ok()
                        .flatten()
                        .map(|v| v.value())
                        .unwrap_or(self.settings.retention_default);
                    Roll::for_retention(self.settings.roll_max, age_ms, max_bytes)
                };
                for partition in 0..topic.partition_count() {
                    let offsets = &topic.partitions[partition as usize];
                    let cursor = self
                        .cursors
                        .entry((id, partition))
                        .or_insert(offsets.start());
                    *cursor = (*cursor).max(offsets.start());
                    let rows = log
                        .range((id, partition, *cursor)..(id, partition, offsets.end()))
                        .map_err(|e| e.to_string())?;
                    for row in rows {
                        let (key, value) = row.map_err(|e| e.to_string())?;
                        let base = key.value().2;
                        let value = value.value();
                        *cursor = base + 1;
                        if !matches!(batch::pointer(value), Ok(None)) {
                            continue;
                        }
                        let at = self
                            .appender
                            .append(id, partition, base, value, batch::is_keyed(value), roll)
                            .map_err(|e| e.to_string())?;
                        moves.push((id, partition, base, batch::encode_pointer(value, at)));
                        bytes += value.len();
                        if bytes >= SEGMENT_MOVE_BYTES_MAX {
                            full = true;
                            break 'topics;
                        }
                    }
                }
            }
        }
        if moves.is_empty() {
            return Ok(Step::CaughtUp);
        }
        self.appender.write().map_err(|e| e.to_string())?;
        self.appender.sync().map_err(|e| e.to_string())?;
        let lengths = self.appender.take_lengths();
        let batches = moves.len();
        match self
            .writer
            .local_blocking(LocalOp::MoveToSegments { moves, lengths })
        {
            Ok(WriteOutcome::MovedToSegments { moved, gone }) => {
                if !gone.is_empty() {
                    tracing::debug!(
                        segments = gone.len(),
                        "retention deleted segments being moved to; starting new ones"
                    );
                    self.appender.abandon(&gone);
                    for id in &gone {
                        self.cursors.remove(&(id.topic, id.partition));
                    }
                }
                tracing::trace!(batches, moved, bytes, "moved batches to segment files");
                self.settings.observer.moved_to_segments(bytes as u64);
                Ok(if full { Step::More } else { Step::CaughtUp })
            }
            Ok(other) => Err(format!("unexpected reply to a move: {other:?}")),
            Err(super::WriteError::ShuttingDown) => Ok(Step::Stopped),
            Err(e) => Err(e.to_string()),
        }
    }
}
