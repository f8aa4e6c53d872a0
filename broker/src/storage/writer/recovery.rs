//! The writer's recovery from an I/O error: redb latches a failed write or
//! fsync, so the writer closes the database and opens it again
//! ([`crate::storage::db::Db::reopen`]), every `REOPEN_RETRY_INTERVAL` while
//! the cause lasts, refusing writes meanwhile. The reopened file holds the
//! last checkpoint, so the frames memory counts as committed past it are
//! applied again by a shadow writer with state loaded from the file; then
//! it checks that the disk holds exactly what memory says was committed.
//!
//! Invariants: while `Writer::recovering` is set no write transaction is
//! begun; it is cleared only after a reopen found the disk matching memory.
//! A disk that does not match is not patched: the broker keeps refusing
//! writes until a restart reloads every piece of state from the file.

use super::{tables, AtomicU64, Msg, State, StorageError, TopicRegistry, Writer};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How often the writer tries to reopen a database that failed, and how
/// long it sleeps between looks at its queue meanwhile.
const REOPEN_RETRY_INTERVAL: Duration = Duration::from_secs(1);
const RECOVERY_POLL_INTERVAL: Duration = Duration::from_millis(100);

pub(super) struct Recovery {
    since: Instant,
    last_try: Option<Instant>,
    tries: u32,
    pub(super) cause: String,
    /// The disk did not match memory after a reopen: only a restart helps.
    pub(super) needs_restart: bool,
}

impl Recovery {
    pub(super) fn new(cause: String) -> Recovery {
        Recovery {
            since: Instant::now(),
            last_try: None,
            tries: 0,
            cause,
            needs_restart: false,
        }
    }
}

impl Writer {
    /// The next message; while recovering, the reopen is retried between
    /// looks at the queue, so reads come back even if nobody writes.
    pub(super) fn next_message(&mut self, rx: &mut mpsc::Receiver<Msg>) -> Option<Msg> {
        loop {
            if self.recovering.is_none() {
                return rx.blocking_recv();
            }
            match rx.try_recv() {
                Ok(msg) => return Some(msg),
                Err(mpsc::error::TryRecvError::Disconnected) => return None,
                Err(mpsc::error::TryRecvError::Empty) => {
                    self.try_recover();
                    if self.recovering.is_some() {
                        std::thread::sleep(RECOVERY_POLL_INTERVAL);
                    }
                }
            }
        }
    }

    /// Reopen the failed database, at most every `REOPEN_RETRY_INTERVAL`.
    pub(super) fn try_recover(&mut self) {
        let Some(recovery) = &mut self.recovering else {
            return;
        };
        if recovery.needs_restart
            || recovery
                .last_try
                .is_some_and(|t| t.elapsed() < REOPEN_RETRY_INTERVAL)
        {
            return;
        }
        recovery.last_try = Some(Instant::now());
        recovery.tries += 1;
        let (tries, since) = (recovery.tries, recovery.since);
        if let Err(e) = self.db.reopen() {
            // Every try while the cause lasts would flood the log.
            if tries == 1 || tries % 60 == 0 {
                tracing::warn!(error = %e, tries, "reopening the storage failed; retrying every second");
            } else {
                tracing::debug!(error = %e, tries, "reopening the storage failed");
            }
            return;
        }
        let caught_up = self.catch_up_after_reopen().map_err(|e| e.to_string());
        match caught_up.and_then(|()| self.disk_matches_memory()) {
            Ok(()) => {
                // Record durably where the failed commit's file ends before
                // anything else commits.
                if let Err(e) = self.checkpoint() {
                    tracing::warn!(error = %e, "the checkpoint after reopening failed; retrying");
                    return;
                }
                tracing::warn!(after = ?since.elapsed(), tries,
                    "storage reopened after an I/O error; writes resume");
                self.recovering = None;
                self.options.observer.recovering(false);
            }
            Err(mismatch) => {
                tracing::error!(%mismatch,
                    "storage reopened, but the disk does not hold what memory says was committed; \
                     writes stay refused until the broker is restarted (reads go on)");
                if let Some(recovery) = &mut self.recovering {
                    recovery.needs_restart = true;
                    recovery.cause = format!("{mismatch}; restart the broker");
                }
            }
        }
    }

    /// The reopened database holds the last checkpoint: apply the frames
    /// memory counts as committed past it again, with state loaded from the
    /// database (a shadow writer), so the database catches up with memory.
    fn catch_up_after_reopen(&mut self) -> Result<(), StorageError> {
        // The frames to apply again are on disk before the shadow's
        // checkpoint makes redb point at them (`durability = none`).
        self.appender.borrow_mut().sync()?;
        let segments = self.appender.borrow().segments().clone();
        let mut replay = self.db.with(|db| segments.frames_past_checkpoint(db))?;
        replay
            .frames
            .retain(|f| f.header.applied_index <= self.counters.applied_index);
        if replay.frames.is_empty() {
            return Ok(());
        }
        let registry = Arc::new(TopicRegistry::default());
        let (schedule, next_scheduled_ms) = self.db.with(|db| {
            crate::storage::load_topics(db, &registry)?;
            for (group, topic_id, partition, offset) in crate::storage::read::all_group_offsets(db)?
            {
                registry.set_committed(&group, topic_id, partition, offset);
            }
            Ok((
                crate::storage::load_schedule(db)?,
                crate::storage::first_scheduled(db)?,
            ))
        })?;
        let (_, counters) = crate::storage::load_counters(&*self.db)?;
        let mut shadow = Writer::new(
            self.db.clone(),
            segments,
            State {
                registry,
                schedule: Arc::new(Mutex::new(schedule)),
                next_scheduled_ms: Arc::new(AtomicU64::new(next_scheduled_ms)),
                counters,
            },
            self.options.clone(),
        );
        shadow.replay(replay)
    }

    /// After the catch-up the file holds what memory counts as committed.
    /// If not (frames lost with `durability = none`, or a file that does not
    /// read back), counters or partition ends differ, and so may topics,
    /// offsets and the transaction schedule, which only a restart reloads.
    fn disk_matches_memory(&self) -> Result<(), String> {
        let storage = |e: StorageError| e.to_string();
        let (_, on_disk) = crate::storage::load_counters(&*self.db).map_err(storage)?;
        if on_disk != self.counters {
            return Err(format!(
                "counters on disk {on_disk:?}, in memory {:?}",
                self.counters
            ));
        }
        let txn = crate::storage::ReadSource::read_txn(&*self.db).map_err(storage)?;
        let partitions = txn
            .open_table(tables::PARTITIONS)
            .map_err(|e| e.to_string())?;
        for topic in self.registry.list() {
            for p in 0..topic.partition_count() {
                let stored = partitions
                    .get((topic.id(), p))
                    .map_err(|e| e.to_string())?
                    .map(|v| v.value())
                    .unwrap_or((0, 0));
                let offsets = &topic.partitions[p as usize];
                let in_memory = (offsets.start(), offsets.end());
                if in_memory != stored {
                    return Err(format!(
                        "{} partition {p}: offsets on disk {stored:?}, in memory {in_memory:?}",
                        topic.name
                    ));
                }
            }
        }
        Ok(())
    }
}
