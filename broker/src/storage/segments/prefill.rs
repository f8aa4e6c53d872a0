//! Zero-filled segment files made ahead of the appender, so that the
//! fdatasync of each commit flushes data only.
//!
//! Why: on ext4 an fdatasync after an append that grows the file (or fills
//! blocks that `fallocate` reserved) also commits the journal, for the new
//! size and block map; in a file whose blocks were already written and
//! synced it does not. 100 KB appends each followed by fdatasync took a
//! median of 290-350 us in a growing file and 160-180 us in a zero-filled
//! one on this project's 2-core test machine, and a single producer waits
//! for one such commit per request. The price is a second write of the
//! file's bytes (the zeros), so the appender asks for a file only while the
//! writer is latency-bound (mostly idle between commits), where the disk
//! has the bandwidth to spare; a writer that is busy most of the time is
//! bound by bandwidth and keeps growing its files
//! ([`prefill_due`]).
//!
//! Owns: one background thread (started on the first request) and at most
//! one file, [`PREFILL_FILE_NAME`] in the segments directory, which start-up
//! deletes if it is there: it holds nothing.
//!
//! Invariants:
//! - A file is handed over only once all its zeros and its length are
//!   synced; the appender renames it to the next segment's name.
//! - A segment made from a prefilled file is longer than its frames until
//!   it is closed: zeros are no frame (`frames::scan` stops at them), so
//!   recovery cuts them off like a torn tail, and a closed file is trimmed
//!   to its frames in the background ([`Prefiller::trim`]).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The file being prefilled or ready, in the segments directory.
pub const PREFILL_FILE_NAME: &str = "next.prefill";
/// Zeros written per call, straight to the disk (`O_DIRECT`): written
/// through the page cache in 1 MiB calls they left folios that large
/// there, and an fdatasync writes every dirty folio whole, so each 100 KB
/// commit into them wrote about 1 MiB (9.8x the payload at the block
/// layer); written a page at a time they cost half a core. The appender's
/// writes make folios of their own size instead, and it pads each write to
/// a whole page ([`PAGE_BYTES`]) so the page after it is never read back
/// from disk. A quarter of a mebibyte: a commit's sync queued behind one
/// waits a fraction of a millisecond.
pub const PREFILL_WRITE_BYTES: usize = 256 << 10;
/// Page size the appender pads its writes in a prefilled file to, and the
/// alignment of `O_DIRECT` writes.
pub const PAGE_BYTES: u64 = 4096;
/// Zeros written between two fdatasyncs (each records the file's new
/// length and blocks).
const PREFILL_SYNC_EVERY_BYTES: u64 = 8 << 20;
/// Zeros are written at this multiple of the rate the active file is
/// appended to: the next file is ready when the active one is about three
/// quarters full. Unpaced, the zeros went at 1.1 GB/s and the commits'
/// syncs behind them took 4x as long.
pub const PREFILL_PACE_FACTOR: u64 = 2;
/// The slowest the zeros are written, bytes a second.
pub const PREFILL_BYTES_PER_SEC_MIN: u64 = 16 << 20;
/// The active file asks for the next one once it holds this fraction of
/// its roll size (1/4): early enough for the zeros to be written before it
/// rolls, late enough that a file rolled by age asks for none.
pub const PREFILL_AT_ROLL_DIVISOR: u64 = 4;
/// Prefill only while the writer spent less than this fraction of the
/// last [`LOAD_WINDOW`] committing: above it the write path is bound by the
/// disk's bandwidth, which the zeros would take from it. A single producer
/// kept the writer busy 53-58% of the time, four producers 90-99%.
pub const PREFILL_WRITER_BUSY_FRACTION_MAX: f64 = 0.8;
/// Prefill only when the filesystem has this many times the file's size
/// free.
const PREFILL_FREE_SPACE_FACTOR: u64 = 4;
/// The span over which the writer's load is measured.
pub const LOAD_WINDOW: Duration = Duration::from_millis(250);
/// Fewest commits a window needs to say how busy the writer is: an idle
/// spell, or the start of a burst, says nothing.
pub const LOAD_WINDOW_COMMITS_MIN: u64 = 20;

/// Whether the active file, `length` bytes long with a roll size of
/// `roll_bytes`, should have the next file prefilled now, the writer having
/// been busy `busy_fraction` of its recent time.
pub fn prefill_due(length: u64, roll_bytes: u64, busy_fraction: f64) -> bool {
    length >= roll_bytes / PREFILL_AT_ROLL_DIVISOR
        && busy_fraction < PREFILL_WRITER_BUSY_FRACTION_MAX
}

/// One whole window of the writer's load.
#[derive(Debug, Clone, Copy, Default)]
struct Window {
    busy_fraction: f64,
    bytes_per_sec: u64,
    commits: u64,
}

/// The writer's recent load, over its last two whole [`LOAD_WINDOW`]s (a
/// window closes at the first commit after it ends, so an idle spell is
/// one window of few commits).
#[derive(Debug)]
pub struct WriterLoad {
    window_start: Instant,
    busy: Duration,
    bytes: u64,
    commits: u64,
    last: [Window; 2],
}

impl WriterLoad {
    pub fn new(now: Instant) -> WriterLoad {
        WriterLoad {
            window_start: now,
            busy: Duration::ZERO,
            bytes: 0,
            commits: 0,
            last: [Window::default(); 2],
        }
    }

    /// A commit of `bytes` that took `busy`, ending at `now`.
    pub fn add(&mut self, now: Instant, busy: Duration, bytes: u64) {
        self.busy += busy;
        self.bytes += bytes;
        self.commits += 1;
        let span = now.saturating_duration_since(self.window_start);
        if span >= LOAD_WINDOW {
            let seconds = span.as_secs_f64();
            self.last = [
                self.last[1],
                Window {
                    busy_fraction: self.busy.as_secs_f64() / seconds,
                    bytes_per_sec: (self.bytes as f64 / seconds) as u64,
                    commits: self.commits,
                },
            ];
            self.window_start = now;
            self.busy = Duration::ZERO;
            self.bytes = 0;
            self.commits = 0;
        }
    }

    /// Two windows of a writer busy `busy_fraction` of the time.
    #[cfg(test)]
    pub fn steady(busy_fraction: f64) -> WriterLoad {
        let start = Instant::now();
        let mut load = WriterLoad::new(start);
        let commits = LOAD_WINDOW_COMMITS_MIN as u32;
        for i in 1..=2 * commits {
            let busy = LOAD_WINDOW.mul_f64(busy_fraction) / commits;
            load.add(start + LOAD_WINDOW * i / commits, busy, 1000);
        }
        load
    }

    /// The higher busy fraction and the higher rate (bytes a second) of the
    /// last two windows; `None` unless both had
    /// [`LOAD_WINDOW_COMMITS_MIN`] commits.
    pub fn recent(&self) -> Option<(f64, u64)> {
        let [a, b] = self.last;
        (a.commits.min(b.commits) >= LOAD_WINDOW_COMMITS_MIN).then_some((
            a.busy_fraction.max(b.busy_fraction),
            a.bytes_per_sec.max(b.bytes_per_sec),
        ))
    }
}

#[derive(Default)]
struct State {
    /// Bytes of the file asked for, not yet started, and how fast to
    /// write them (bytes a second).
    requested: Option<(u64, u64)>,
    /// The thread is writing a file.
    filling: bool,
    /// A file ready to take, and its length.
    ready: Option<u64>,
    /// Closed segments to cut to their frames' end.
    trims: Vec<(Arc<File>, u64)>,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

/// Prefills the next segment file in the background; see the module doc.
pub struct Prefiller {
    dir: PathBuf,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Prefiller {
    /// A prefiller for `dir`, or `None` where prefilling cannot help: on a
    /// filesystem in memory (tmpfs, ramfs) an fdatasync writes nothing.
    pub fn for_dir(dir: &Path) -> Option<Prefiller> {
        const TMPFS_MAGIC: i64 = 0x0102_1994;
        const RAMFS_MAGIC: i64 = 0x8584_58f6;
        if let Ok(fs) = rustix::fs::statfs(dir) {
            #[allow(clippy::unnecessary_cast)] // the type differs per platform
            let kind = fs.f_type as i64;
            if kind == TMPFS_MAGIC || kind == RAMFS_MAGIC {
                tracing::debug!(dir = %dir.display(), "no segment prefill on a filesystem in memory");
                return None;
            }
        }
        Some(Prefiller {
            dir: dir.to_path_buf(),
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                wake: Condvar::new(),
            }),
            thread: None,
        })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(PREFILL_FILE_NAME)
    }

    /// Ask for a file of `bytes` (rounded up to a whole write), filled at
    /// [`PREFILL_PACE_FACTOR`] times `append_bytes_per_sec`, unless one is
    /// ready or being written.
    pub fn request(&mut self, bytes: u64, append_bytes_per_sec: u64) {
        {
            let mut state = self.shared.state.lock().expect("prefill state");
            if state.ready.is_some() || state.filling || state.requested.is_some() {
                return;
            }
            let bytes = bytes.next_multiple_of(PREFILL_WRITE_BYTES as u64);
            let pace = append_bytes_per_sec
                .saturating_mul(PREFILL_PACE_FACTOR)
                .max(PREFILL_BYTES_PER_SEC_MIN);
            state.requested = Some((bytes, pace));
        }
        self.start_thread();
        self.shared.wake.notify_one();
    }

    /// The ready file's length, handing it over: the caller renames
    /// [`Self::path`] before it asks for another.
    pub fn take(&mut self) -> Option<u64> {
        self.shared
            .state
            .lock()
            .expect("prefill state")
            .ready
            .take()
    }

    #[cfg(test)]
    pub fn is_ready(&self) -> bool {
        self.shared
            .state
            .lock()
            .expect("prefill state")
            .ready
            .is_some()
    }

    /// Cut a closed segment made from a prefilled file to its `length`.
    /// Not synced: should a crash undo it, start-up cuts the zeros.
    pub fn trim(&mut self, file: Arc<File>, length: u64) {
        self.shared
            .state
            .lock()
            .expect("prefill state")
            .trims
            .push((file, length));
        self.start_thread();
        self.shared.wake.notify_one();
    }

    fn start_thread(&mut self) {
        if self.thread.is_some() {
            return;
        }
        let shared = self.shared.clone();
        let path = self.path();
        let dir = self.dir.clone();
        let spawned = std::thread::Builder::new()
            .name("segment-prefill".into())
            .spawn(move || run(&shared, &dir, &path));
        match spawned {
            Ok(thread) => self.thread = Some(thread),
            Err(e) => tracing::warn!(error = %e, "starting the segment prefill thread"),
        }
    }
}

impl Drop for Prefiller {
    fn drop(&mut self) {
        self.shared.state.lock().expect("prefill state").stop = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // A stopped broker holds no zeros; start-up would delete them.
        let _ = std::fs::remove_file(self.path());
    }
}

fn run(shared: &Shared, dir: &Path, path: &Path) {
    loop {
        let (bytes, trims) = {
            let mut state = shared.state.lock().expect("prefill state");
            while !state.stop && state.requested.is_none() && state.trims.is_empty() {
                state = shared.wake.wait(state).expect("prefill state");
            }
            if state.stop {
                // Trims left undone are cut at the next start-up.
                return;
            }
            let bytes = state.requested.take();
            state.filling = bytes.is_some();
            (bytes, std::mem::take(&mut state.trims))
        };
        for (file, length) in trims {
            if let Err(e) = file.set_len(length) {
                tracing::debug!(error = %e, "trimming a prefilled segment");
            }
        }
        let Some((bytes, pace)) = bytes else { continue };
        let stop = || shared.state.lock().expect("prefill state").stop;
        let result = fill(dir, path, bytes, pace, &stop);
        let mut state = shared.state.lock().expect("prefill state");
        state.filling = false;
        match result {
            Ok(true) => {
                tracing::debug!(file = %path.display(), bytes, "segment file prefilled");
                state.ready = Some(bytes);
            }
            Ok(false) => {
                let _ = std::fs::remove_file(path);
            }
            Err(e) => {
                tracing::info!(error = %e, file = %path.display(), "prefilling a segment file failed; segments grow as they are written");
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// Write `bytes` (a multiple of [`PREFILL_WRITE_BYTES`]) of zeros to
/// `path` at `pace` bytes a second and sync them; `Ok(false)` when there
/// is too little free space or `stop` said to give up.
fn fill(
    dir: &Path,
    path: &Path,
    bytes: u64,
    pace: u64,
    stop: &dyn Fn() -> bool,
) -> std::io::Result<bool> {
    use std::os::unix::fs::OpenOptionsExt;
    let free = rustix::fs::statvfs(dir).map(|s| s.f_bavail.saturating_mul(s.f_frsize))?;
    if free < bytes.saturating_mul(PREFILL_FREE_SPACE_FACTOR) {
        tracing::debug!(
            free,
            bytes,
            "too little free space to prefill a segment file"
        );
        return Ok(false);
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    // O_DIRECT wants the buffer aligned too.
    let buffer = vec![0u8; PREFILL_WRITE_BYTES + PAGE_BYTES as usize];
    let offset = buffer.as_ptr().align_offset(PAGE_BYTES as usize);
    let zeros = &buffer[offset..offset + PREFILL_WRITE_BYTES];
    let started = std::time::Instant::now();
    let mut at = 0;
    while at < bytes {
        file.write_all_at(zeros, at)?;
        at += PREFILL_WRITE_BYTES as u64;
        if at % PREFILL_SYNC_EVERY_BYTES == 0 {
            file.sync_data()?;
            if stop() {
                return Ok(false);
            }
        }
        let due = Duration::from_secs_f64(at as f64 / pace as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    file.sync_data()?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn the_next_file_is_due_from_a_quarter_of_the_roll_size() {
        let roll = 256 * MIB;
        assert!(!prefill_due(roll / 4 - 1, roll, 0.0));
        assert!(prefill_due(roll / 4, roll, 0.0));
    }

    #[test]
    fn a_writer_busy_most_of_the_time_gets_no_prefill() {
        let roll = 256 * MIB;
        let limit = PREFILL_WRITER_BUSY_FRACTION_MAX;
        assert!(prefill_due(roll, roll, limit - 0.01));
        assert!(!prefill_due(roll, roll, limit));
    }

    /// `commits` commits spread over one window from `at`, busy `busy`
    /// in all, of 1,000 bytes each; returns where the window ended.
    fn window(load: &mut WriterLoad, at: Instant, commits: u64, busy: Duration) -> Instant {
        for i in 1..=commits {
            let now = at + LOAD_WINDOW * i as u32 / commits as u32;
            load.add(now, busy / commits as u32, 1000);
        }
        at + LOAD_WINDOW
    }

    #[test]
    fn the_load_is_known_after_two_windows_of_enough_commits() {
        let start = Instant::now();
        let mut load = WriterLoad::new(start);
        let ms = Duration::from_millis;
        // An idle spell closes as one window of one commit.
        load.add(start + ms(10_000), ms(1), 1000);
        assert_eq!(load.recent(), None);
        let end = window(&mut load, start + ms(10_000), 40, ms(100));
        assert_eq!(load.recent(), None, "one window says nothing");
        let end = window(&mut load, end, 40, ms(150));
        let (busy, rate) = load.recent().expect("two busy windows");
        assert!((busy - 0.6).abs() < 1e-9, "the busier: {busy}");
        assert_eq!(rate, 160_000);
        // One commit short of the minimum in a window: unknown again.
        let end = window(&mut load, end, LOAD_WINDOW_COMMITS_MIN - 1, ms(10));
        assert_eq!(load.recent(), None);
        window(&mut load, end, LOAD_WINDOW_COMMITS_MIN, ms(10));
        assert!(load.recent().is_none());
        let mut load = WriterLoad::new(start);
        let end = window(&mut load, start, LOAD_WINDOW_COMMITS_MIN, ms(10));
        window(&mut load, end, LOAD_WINDOW_COMMITS_MIN, ms(10));
        assert!(load.recent().is_some(), "at the minimum in both");
    }

    #[test]
    fn a_file_is_prefilled_synced_and_handed_over_once() {
        let dir = tempfile::tempdir().expect("temp dir");
        let Some(mut prefiller) = Prefiller::for_dir(dir.path()) else {
            eprintln!("skipped: the temporary directory is in memory");
            return;
        };
        prefiller.request(3 * MIB + 5, 1 << 30);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let bytes = loop {
            if let Some(bytes) = prefiller.take() {
                break bytes;
            }
            assert!(std::time::Instant::now() < deadline, "no file in 30 s");
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(bytes, 3 * MIB + PREFILL_WRITE_BYTES as u64, "whole writes");
        let on_disk = std::fs::read(prefiller.path()).expect("prefilled file");
        assert_eq!(on_disk.len() as u64, bytes);
        assert!(on_disk.iter().all(|b| *b == 0));
        assert_eq!(prefiller.take(), None);
    }
}
