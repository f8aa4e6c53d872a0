//! The writer's recovery from an I/O error: redb latches a failed write or
//! fsync, so the writer closes the database and opens it again
//! ([`crate::storage::db::Db::reopen`]), every `REOPEN_RETRY_INTERVAL` while
//! the cause lasts, refusing writes meanwhile; then memory follows the disk.
//!
//! Invariants: while `Writer::recovering` is set no write transaction is
//! begun; it is cleared only after a reopen and `follow_the_disk` succeeded.

use super::{tables, Msg, StorageError, Writer};
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
}

impl Recovery {
    pub(super) fn new(cause: String) -> Recovery {
        Recovery {
            since: Instant::now(),
            last_try: None,
            tries: 0,
            cause,
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
        if recovery
            .last_try
            .is_some_and(|t| t.elapsed() < REOPEN_RETRY_INTERVAL)
        {
            return;
        }
        recovery.last_try = Some(Instant::now());
        recovery.tries += 1;
        let (tries, since) = (recovery.tries, recovery.since);
        match self.db.reopen().and_then(|()| self.follow_the_disk()) {
            Ok(()) => {
                tracing::warn!(after = ?since.elapsed(), tries,
                    "storage reopened after an I/O error; writes resume");
                self.recovering = None;
                crate::metrics::global().storage_recovering.set(0);
            }
            // Every try while the cause lasts would flood the log.
            Err(e) if tries == 1 || tries % 60 == 0 => {
                tracing::warn!(error = %e, tries, "reopening the storage failed; retrying every second")
            }
            Err(e) => tracing::debug!(error = %e, tries, "reopening the storage failed"),
        }
    }

    /// After a reopen the file holds the last commit that reached the disk.
    /// A commit reported failed may still have reached it (an fsync that
    /// failed after its data was written): then the counters and partition
    /// ends on disk are ahead of memory, and memory follows the disk. Its
    /// requests were answered with errors; what they stored stays.
    fn follow_the_disk(&mut self) -> Result<(), StorageError> {
        let (_, on_disk) = crate::storage::load_counters(&*self.db)?;
        if on_disk != self.counters {
            tracing::warn!(?on_disk, in_memory = ?self.counters,
                "a commit reported failed reached the disk; following the disk");
            self.counters = on_disk;
        }
        let txn = crate::storage::ReadSource::read_txn(&*self.db)?;
        let partitions = txn.open_table(tables::PARTITIONS)?;
        let mut moved = false;
        for topic in self.registry.list() {
            for p in 0..topic.partition_count() {
                let stored = partitions
                    .get((topic.id(), p))?
                    .map(|v| v.value())
                    .unwrap_or((0, 0));
                let offsets = &topic.partitions[p as usize];
                if (offsets.start(), offsets.end()) != stored {
                    tracing::warn!(topic = %topic.name, partition = p, ?stored,
                        in_memory = ?(offsets.start(), offsets.end()),
                        "partition offsets on disk differ after a failed commit; following the disk");
                    offsets.set(stored.0, stored.1);
                    moved = true;
                }
            }
        }
        if moved {
            self.registry.signal_appended();
        }
        Ok(())
    }
}
