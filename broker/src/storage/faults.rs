//! A redb storage backend for fault-injection tests: it behaves like a disk
//! with a write-back cache and can be told to fail.
//!
//! Owns: writes since the last successful `sync_data`, held in memory (reads
//! see them) and written to the file and fsynced only by the next sync.
//! What is not synced is therefore lost when the process dies, as it would
//! be in a power cut, and when a sync fails, as Linux drops dirty pages after
//! an fsync error.
//!
//! Faults are switched by files in `<data dir>/faults/`, so a test can flip
//! them while the broker runs:
//! - `fail-write`: every write fails while the file exists;
//! - `fail-sync`: every sync fails (and its pending writes are lost);
//! - `power-cut-after-writes`: holds N; after N more writes the process
//!   aborts on the spot, mid-commit, with everything unsynced lost.
//!
//! The log's segment files ([`super::segments`]) take two more switches:
//! `fail-segment-write` and `fail-segment-sync`. And `ack-before-commit`
//! breaks the broker on purpose: the writer answers requests before it
//! commits them (see the crash driver's test that its oracle notices).
//!
//! Used only when the broker starts with `MSMQ_STORAGE_FAULTS=1`; the
//! normal backend is redb's own file backend.

use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};
use std::ops::Bound;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// The environment variable that turns fault injection on.
pub const FAULTS_ENV: &str = "MSMQ_STORAGE_FAULTS";
/// The directory, under the data directory, of the switch files.
pub const FAULTS_DIR: &str = "faults";

#[derive(Debug)]
pub struct FaultyBackend {
    file: FileBackend,
    switches: PathBuf,
    pending: Mutex<Pending>,
    /// Writes left before a power cut; `u64::MAX` when none is armed.
    writes_to_cut: AtomicU64,
}

#[derive(Debug, Default)]
struct Pending {
    writes: Vec<(u64, Vec<u8>)>,
    len: Option<u64>,
}

fn io(message: &str) -> std::io::Error {
    std::io::Error::other(format!("injected fault: {message}"))
}

impl FaultyBackend {
    pub fn new(
        file: std::fs::File,
        data_dir: &std::path::Path,
    ) -> Result<Self, redb::DatabaseError> {
        Ok(FaultyBackend {
            file: FileBackend::new(file)?,
            switches: data_dir.join(FAULTS_DIR),
            pending: Mutex::new(Pending::default()),
            writes_to_cut: AtomicU64::new(u64::MAX),
        })
    }

    fn switch(&self, name: &str) -> bool {
        self.switches.join(name).exists()
    }

    /// Count one write towards an armed power cut; arm one if its file appeared.
    fn power_cut_check(&self) {
        let mut left = self.writes_to_cut.load(Ordering::Acquire);
        if left == u64::MAX {
            let Ok(text) = std::fs::read_to_string(self.switches.join("power-cut-after-writes"))
            else {
                return;
            };
            left = text.trim().parse().unwrap_or(0);
            let _ = std::fs::remove_file(self.switches.join("power-cut-after-writes"));
        }
        if left == 0 {
            eprintln!("injected fault: power cut mid-commit");
            std::process::abort();
        }
        self.writes_to_cut.store(left - 1, Ordering::Release);
    }
}

impl StorageBackend for FaultyBackend {
    fn len(&self) -> Result<u64, std::io::Error> {
        let pending = self.pending.lock().expect("pending lock");
        match pending.len {
            Some(len) => Ok(len),
            None => self.file.len(),
        }
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        let pending = self.pending.lock().expect("pending lock");
        let file_len = self.file.len()?;
        let end = offset + out.len() as u64;
        out.fill(0);
        if offset < file_len {
            let from_file = (end.min(file_len) - offset) as usize;
            self.file.read(offset, &mut out[..from_file])?;
        }
        for (at, data) in &pending.writes {
            let (w_start, w_end) = (*at, *at + data.len() as u64);
            let (lo, hi) = (w_start.max(offset), w_end.min(end));
            if lo < hi {
                out[(lo - offset) as usize..(hi - offset) as usize]
                    .copy_from_slice(&data[(lo - w_start) as usize..(hi - w_start) as usize]);
            }
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        let mut pending = self.pending.lock().expect("pending lock");
        // Bytes past a shrink must read as zero if the file grows again.
        pending.writes.retain_mut(|(at, data)| {
            if *at >= len {
                return false;
            }
            data.truncate((len - *at).min(data.len() as u64) as usize);
            true
        });
        pending.len = Some(len);
        Ok(())
    }

    fn sync_data(&self) -> Result<(), std::io::Error> {
        let mut pending = self.pending.lock().expect("pending lock");
        if self.switch("fail-sync") {
            *pending = Pending::default();
            return Err(io("sync failed; unsynced writes lost"));
        }
        if let Some(len) = pending.len.take() {
            self.file.set_len(len)?;
        }
        for (at, data) in pending.writes.drain(..) {
            self.file.write(at, &data)?;
        }
        self.file.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        if self.switch("fail-write") {
            return Err(io("write failed"));
        }
        self.power_cut_check();
        let mut pending = self.pending.lock().expect("pending lock");
        pending.writes.push((offset, data.to_vec()));
        Ok(())
    }

    fn close(&self) -> Result<(), std::io::Error> {
        self.file.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.file.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.file.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.file.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.file.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.file.unlock_range(start, end)
    }
}
