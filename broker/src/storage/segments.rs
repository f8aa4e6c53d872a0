//! The log's batch bytes, in one sequence of append-only segment files per
//! broker: `<data dir>/segments/<number>.seg`, numbered in the order they
//! were started. Every batch a group commit stores, whatever its topic and
//! partition, is appended to the one active file, so a commit makes its
//! bytes durable with one fdatasync however many partitions it touched.
//! Why one sequence and not one per partition: on ext4 the fdatasyncs of
//! several files cost several flushes (4 files of 50 KB synced in turn took
//! 1.5-1.6 ms against 0.7-1.3 ms for one file of 200 KB; in parallel threads
//! 4.8-6.0 ms), and a group commit of four producers touched four files.
//! It is also the layout of a command log that a replica set ships.
//!
//! Why files beside redb: redb grows its file by doubling while it is under
//! one region (4 GiB) and gives space back only when the last half of it is
//! free, so a log kept inside it takes anywhere from about 1.3 to 2.6 times
//! its retained size. A file is deleted whole once no batch in it is kept.
//!
//! Since the command-log step the files hold frames (`super::frames`):
//! each group commit appends one frame, its batches followed by its
//! commands, so the batch bytes a log row points at sit inside a frame.
//!
//! Layout: this module has the files, start-up recovery and reads (about
//! 620 lines, then 560 of tests of the whole); `appender` the writer's
//! appends, frames and replay mode; `reaper` the deletion of files no row
//! points into; `prefill` the zero-filled files the appender rolls into
//! while the writer is latency-bound. Over 800 lines only because the tests of all three live
//! here: they drive appender, recovery and reads together on one fixture.
//!
//! Invariants:
//! - The frames are the commit point: a frame is written and synced before
//!   the redb commit of its effects, and acknowledged only then. redb is
//!   committed without an fsync between checkpoints; at start-up the frames
//!   past the checkpoint's `log_file`/`log_end` are applied again
//!   ([`Replay`]), so the index catches up with the log.
//! - A log row holds a [`Pointer`] (file number, position, length,
//!   checksum). The `log_files` table names each file: a row written by the
//!   commit that starts it, holding [`OPEN`] while it is appended to and its
//!   committed length once a later commit closed it (rolled past it, or
//!   after a failed commit). So an append writes no `log_files` row.
//! - Bytes past the last whole frame belong to a commit that failed or was
//!   cut short. A failed commit cuts its frame off (best effort) and the
//!   appender starts a new file, so nothing is appended behind them, and
//!   start-up ([`Segments::recover`]) cuts torn tails off and deletes files
//!   no row names and no frame to apply again is in.
//! - A frame never spans two files: the active file rolls only between
//!   frames.
//! - A partition's rows point into files in the order of their offsets, so
//!   no row points below the oldest file that some partition's first row
//!   points into. Files below it (and below the active one) are deleted
//!   ([`SegmentReaper`]) after the commit that dropped their rows, which is
//!   a checkpoint (durable) under any `durability`. A reader that still
//!   holds the file open reads on; one that opens it later finds nothing,
//!   which means "trimmed".
//! - Per-topic retention still bounds the disk: the active file rolls when
//!   it is older or larger than the roll of the first topic appending to it
//!   in a commit ([`Roll::for_retention`]). A file lives as long as its
//!   longest-kept batch.
//! - Data directories of the earlier layout (one file sequence per
//!   partition, named in the `segments` table) are moved into the broker's
//!   sequence at start-up by hard links, in a durable commit; no byte is
//!   copied. Files of versions before frames hold bare batches: start-up
//!   looks for frames only in files above those.

use super::batch::{self, Pointer};
use super::frames;
use super::{tables, StorageError};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// How far ahead of its readers a segment file is read in the background.
pub const READ_AHEAD_BYTES: u64 = 32 << 20;
/// Directory of the segment files inside the data directory.
pub const SEGMENTS_DIR: &str = "segments";
/// A topic with a retention rolls to a new segment this many times per
/// retention period (or retention size), so at most about one segment in
/// this many holds expired data waiting for its last batch to expire.
pub const SEGMENTS_PER_RETENTION: u64 = 8;
/// The shortest a segment is written to before the next one starts, however
/// short the topic's retention.
pub const SEGMENT_AGE_MIN: Duration = Duration::from_millis(100);
/// `log_files` value of the file being appended to: its committed length is
/// where the last batch a row points at in it ends.
pub const OPEN: u64 = u64::MAX;
/// Largest batch a pointer may claim (a batch is at most 32 MiB): a longer
/// one is corruption, not a reason to allocate.
const POINTER_BYTES_MAX: u32 = 64 << 20;
/// Bytes gathered before they are written out.
const PENDING_BYTES_MAX: usize = 1 << 20;
/// Segment files kept open for reading; past this the cache starts over.
const READ_FILES_OPEN_MAX: usize = 1024;
const SEGMENT_FILE_SUFFIX: &str = "seg";
/// Fault switch (tests only): segment writes fail while it exists.
const FAULT_WRITE: &str = "fail-segment-write";
/// Fault switch (tests only): segment fsyncs fail while it exists.
const FAULT_SYNC: &str = "fail-segment-sync";

/// When the writer starts a new segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roll {
    pub bytes_max: u64,
    pub age_max: Duration,
}

impl Roll {
    /// The roll for a topic keeping `retention_ms` (0: no age limit) and
    /// `retention_bytes` (0: no size limit), within the broker's maxima.
    pub fn for_retention(broker_max: Roll, retention_ms: u64, retention_bytes: u64) -> Roll {
        let mut roll = broker_max;
        if retention_ms > 0 {
            let age = Duration::from_millis(retention_ms / SEGMENTS_PER_RETENTION);
            roll.age_max = roll.age_max.min(age.max(SEGMENT_AGE_MIN));
        }
        if retention_bytes > 0 {
            roll.bytes_max = roll.bytes_max.min(retention_bytes / SEGMENTS_PER_RETENTION);
        }
        roll
    }
}

/// Where the batches of the open file `number` end: the furthest end of
/// the rows pointing into it, found from each partition's last rows.
fn open_file_length(
    log: &impl ReadableTable<(u32, u32, u64), &'static [u8]>,
    partitions: &impl ReadableTable<(u32, u32), (u64, u64)>,
    number: u64,
) -> Result<u64, StorageError> {
    let mut length = 0;
    for entry in partitions.iter()? {
        let (topic, partition) = entry?.0.value();
        for row in log
            .range((topic, partition, 0)..=(topic, partition, u64::MAX))?
            .rev()
        {
            // Rows of older versions may hold their batch: not in a file.
            let Some(at) = batch::pointer(row?.1.value()).map_err(StorageError::Corrupt)? else {
                continue;
            };
            if at.segment < number {
                break;
            }
            if at.segment == number {
                length = length.max(at.position + at.length as u64);
            }
        }
    }
    Ok(length)
}

/// Each named file's committed length, and the files that were still open
/// (their lengths found from the rows).
fn committed_lengths(db: &Database) -> Result<(BTreeMap<u64, u64>, Vec<u64>), StorageError> {
    let txn = db.begin_read()?;
    let files = txn.open_table(tables::LOG_FILES)?;
    let mut lengths = BTreeMap::new();
    for entry in files.iter()? {
        let (number, length) = entry.map(|(k, v)| (k.value(), v.value()))?;
        lengths.insert(number, length);
    }
    let open: Vec<u64> = lengths
        .iter()
        .filter(|(_, length)| **length == OPEN)
        .map(|(n, _)| *n)
        .collect();
    if !open.is_empty() {
        let log = txn.open_table(tables::LOG)?;
        let partitions = txn.open_table(tables::PARTITIONS)?;
        for number in &open {
            lengths.insert(*number, open_file_length(&log, &partitions, *number)?);
        }
    }
    Ok((lengths, open))
}

/// Record the lengths found for the files the last run left open: the
/// appender starts a new file, so they are closed now, and the next
/// start-up need not look for their ends again.
fn close_open_files(
    db: &Database,
    committed: &BTreeMap<u64, u64>,
    open: &[u64],
) -> Result<(), StorageError> {
    if open.is_empty() {
        return Ok(());
    }
    let txn = db.begin_write()?;
    {
        let mut files = txn.open_table(tables::LOG_FILES)?;
        for number in open {
            files.insert(*number, committed[number])?;
        }
    }
    txn.commit()?;
    Ok(())
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> StorageError {
    StorageError::Redb(format!("{what} {}: {e}", path.display()))
}

/// A segment file open for reading, and how far ahead of its readers the
/// kernel was asked to read.
struct ReadFile {
    file: File,
    advised_to: AtomicU64,
}

impl ReadFile {
    /// Ask the kernel to read [`READ_AHEAD_BYTES`] past `end` in the
    /// background once readers come within half of that of the last such
    /// request. Partitions' batches are interleaved in a file, so readers of
    /// several partitions read it as several streams at nearby positions,
    /// which the kernel's own readahead takes for random reads (a cold
    /// drain read 1 KB messages at 0.88x the speed of one file per
    /// partition); one large request serves all of them.
    fn read_ahead(&self, end: u64) {
        let advised = self.advised_to.load(Ordering::Relaxed);
        if end + READ_AHEAD_BYTES / 2 <= advised {
            return;
        }
        let from = advised.max(end);
        let to = end + READ_AHEAD_BYTES;
        if self
            .advised_to
            .compare_exchange(advised, to, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            let _ = rustix::fs::fadvise(
                &self.file,
                from,
                std::num::NonZeroU64::new(to - from),
                rustix::fs::Advice::WillNeed,
            );
        }
    }
}

/// The frames start-up applies again: those past the checkpoint at `from`
/// (file, position; `None` when no row names that file yet).
pub struct Replay {
    pub from: Option<(u64, u64)>,
    pub frames: Vec<frames::FrameAt>,
}

/// The segment files of a data directory, shared by the writer and readers.
pub struct Segments {
    dir: PathBuf,
    readers: RwLock<HashMap<u64, Arc<ReadFile>>>,
    /// For tests: the directory of fault switch files (see [`super::faults`]).
    fault_switches: Option<PathBuf>,
    /// One past the highest file number named at start-up.
    first_free_number: u64,
}

impl Segments {
    /// Bring the segment files in line with the committed `log_files` table
    /// and return them ready for use: bytes past a committed length are cut
    /// off, files without a row are deleted, and a row without its file (or
    /// with a file shorter than committed) is corruption.
    pub fn recover(
        data_dir: &Path,
        db: &Database,
        fault_switches: Option<PathBuf>,
    ) -> Result<(Segments, Replay), StorageError> {
        let mut segments = Segments {
            dir: data_dir.join(SEGMENTS_DIR),
            readers: RwLock::new(HashMap::new()),
            fault_switches,
            first_free_number: 0,
        };
        if !segments.dir.exists() {
            std::fs::create_dir_all(&segments.dir)
                .and_then(|_| File::open(data_dir)?.sync_all())
                .map_err(|e| io_error("creating", &segments.dir, e))?;
        }
        let prefilled = segments.dir.join(prefill::PREFILL_FILE_NAME);
        if prefilled.exists() {
            std::fs::remove_file(&prefilled).map_err(|e| io_error("deleting", &prefilled, e))?;
        }
        segments.move_partition_files(db)?;
        let (mut committed, open) = committed_lengths(db)?;
        let replay = segments.find_frames(db, &mut committed, &open)?;
        close_open_files(db, &committed, &open)?;
        let mut found = Vec::new();
        for (number, path) in segments.files_on_disk()? {
            let Some(&length) = committed.get(&number) else {
                tracing::info!(file = %path.display(), "deleting a segment no commit refers to");
                std::fs::remove_file(&path).map_err(|e| io_error("deleting", &path, e))?;
                continue;
            };
            found.push(number);
            let on_disk = std::fs::metadata(&path)
                .map_err(|e| io_error("reading", &path, e))?
                .len();
            if on_disk < length {
                return Err(StorageError::Corrupt(format!(
                    "segment {} has {on_disk} bytes, {length} were committed",
                    path.display()
                )));
            }
            if on_disk > length {
                tracing::info!(
                    file = %path.display(),
                    bytes = on_disk - length,
                    "cutting uncommitted bytes off a segment"
                );
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| io_error("opening", &path, e))?;
                file.set_len(length)
                    .and_then(|_| file.sync_all())
                    .map_err(|e| io_error("truncating", &path, e))?;
            }
        }
        if let Some(missing) = committed.keys().find(|n| !found.contains(n)) {
            return Err(StorageError::Corrupt(format!(
                "segment file {} is missing",
                segments.path(*missing).display()
            )));
        }
        segments.first_free_number = committed.keys().next_back().map_or(0, |n| n + 1);
        Ok((segments, replay))
    }

    /// The frames past the database's last checkpoint, found without
    /// changing anything (after the writer reopened the database).
    pub fn frames_past_checkpoint(&self, db: &Database) -> Result<Replay, StorageError> {
        let (mut committed, open) = committed_lengths(db)?;
        self.find_frames(db, &mut committed, &open)
    }

    /// Find the frames of the command log past the last checkpoint, and the
    /// length of each file from the checkpoint's on: where its last frame
    /// to apply again ends (files past the checkpoint's holding none are
    /// left out of `committed`, so they are deleted).
    fn find_frames(
        &self,
        db: &Database,
        committed: &mut BTreeMap<u64, u64>,
        open: &[u64],
    ) -> Result<Replay, StorageError> {
        let txn = db.begin_read()?;
        let meta = txn.open_table(tables::META)?;
        let get = |key: &str| -> Result<Option<u64>, StorageError> {
            Ok(meta.get(key)?.map(|v| v.value()))
        };
        let applied_index = get(tables::META_APPLIED_INDEX)?.unwrap_or(0);
        // Before the first checkpoint: from the start of the first file
        // above those named (which hold batches of earlier versions).
        let (from_file, from) = match (get(tables::META_LOG_FILE)?, get(tables::META_LOG_END)?) {
            (Some(file), Some(end)) => (file, end),
            _ => (committed.keys().next_back().map_or(0, |n| n + 1), 0),
        };
        let mut on_disk = self.files_on_disk()?;
        on_disk.retain(|(number, _)| *number >= from_file);
        on_disk.sort();
        let mut scanned = Vec::new();
        for (number, path) in &on_disk {
            let file = File::open(path).map_err(|e| io_error("opening", path, e))?;
            let file_bytes = file
                .metadata()
                .map_err(|e| io_error("reading", path, e))?
                .len();
            let limit = match committed.get(number) {
                Some(&length) if !open.contains(number) => length.min(file_bytes),
                _ => file_bytes,
            };
            let start = if *number == from_file { from } else { 0 };
            scanned.push(frames::scan(&file, *number, start, limit));
        }
        let frames = frames::chain(scanned, applied_index);
        let from_named = committed.contains_key(&from_file);
        for (number, _) in &on_disk {
            let end = frames
                .iter()
                .filter(|f| f.file == *number)
                .map(|f| f.end())
                .max();
            match end {
                Some(end) => {
                    committed.insert(*number, end);
                }
                None if *number == from_file => {
                    committed.insert(*number, from);
                }
                None => {
                    committed.remove(number);
                }
            }
        }
        if !frames.is_empty() {
            tracing::info!(
                frames = frames.len(),
                after_index = applied_index,
                "applying the command log's frames past the last checkpoint again"
            );
        }
        Ok(Replay {
            from: from_named.then_some((from_file, from)),
            frames,
        })
    }

    pub fn path(&self, number: u64) -> PathBuf {
        self.dir.join(format!("{number:020}.{SEGMENT_FILE_SUFFIX}"))
    }

    /// Every `<number>.seg` file in the segments directory.
    fn files_on_disk(&self) -> Result<Vec<(u64, PathBuf)>, StorageError> {
        let mut files = Vec::new();
        let listing =
            std::fs::read_dir(&self.dir).map_err(|e| io_error("listing", &self.dir, e))?;
        for entry in listing {
            let entry = entry.map_err(|e| io_error("listing", &self.dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let number = name
                .strip_suffix(SEGMENT_FILE_SUFFIX)
                .and_then(|n| n.strip_suffix('.'))
                .and_then(|n| n.parse::<u64>().ok());
            if let Some(number) = number {
                files.push((number, entry.path()));
            }
        }
        Ok(files)
    }

    /// Move a data directory of the earlier layout (one file sequence per
    /// partition, `<topic>/<partition>/<base offset>.seg`, named in the
    /// `segments` table) into the broker's sequence: each named file is
    /// hard-linked under a new number, every pointer rewritten, and the
    /// old rows replaced by `log_files` rows in one durable commit; the old
    /// directories go after it. A crash before that commit leaves the old
    /// layout whole (the new links are unnamed and deleted), after it the
    /// new one.
    fn move_partition_files(&self, db: &Database) -> Result<(), StorageError> {
        // A read first: start-up takes no write transaction when there is
        // nothing to move (the usual case).
        if db.begin_read()?.open_table(tables::SEGMENTS)?.is_empty()? {
            return Ok(());
        }
        let txn = db.begin_write()?;
        let named: Vec<(u32, u32, u64)> = {
            let table = txn.open_table(tables::SEGMENTS)?;
            table
                .iter()?
                .map(|e| e.map(|(k, _)| k.value()))
                .collect::<Result<_, _>>()?
        };
        tracing::info!(
            files = named.len(),
            "moving the per-partition segment files into the broker's one sequence"
        );
        let old_path = |(topic, partition, base): (u32, u32, u64)| {
            self.dir
                .join(topic.to_string())
                .join(partition.to_string())
                .join(format!("{base:020}.{SEGMENT_FILE_SUFFIX}"))
        };
        let mut numbers = HashMap::new();
        for (number, id) in named.iter().enumerate() {
            let (from, to) = (old_path(*id), self.path(number as u64));
            let _ = std::fs::remove_file(&to);
            std::fs::hard_link(&from, &to).map_err(|e| io_error("linking", &from, e))?;
            numbers.insert(*id, number as u64);
        }
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_error("syncing", &self.dir, e))?;
        {
            let mut log = txn.open_table(tables::LOG)?;
            let mut files = txn.open_table(tables::LOG_FILES)?;
            let mut rewritten = Vec::new();
            let mut lengths: HashMap<u64, u64> = HashMap::new();
            for row in log.iter()? {
                let (key, value) = row?;
                let (topic, partition, _) = key.value();
                let value = value.value();
                let Some(mut at) = batch::pointer(value).map_err(StorageError::Corrupt)? else {
                    continue;
                };
                let number = *numbers
                    .get(&(topic, partition, at.segment))
                    .ok_or_else(|| {
                        StorageError::Corrupt(format!(
                        "a batch of topic {topic} partition {partition} points into segment {} \
                         that the segments table does not name",
                        at.segment
                    ))
                    })?;
                at.segment = number;
                let end = lengths.entry(number).or_default();
                *end = (*end).max(at.position + at.length as u64);
                rewritten.push((key.value(), batch::encode_pointer(value, at)));
            }
            for (key, row) in rewritten {
                log.insert(key, row.as_slice())?;
            }
            for number in numbers.values() {
                files.insert(*number, lengths.get(number).copied().unwrap_or(0))?;
            }
            txn.open_table(tables::SEGMENTS)?.retain(|_, _| false)?;
        }
        txn.commit()?;
        for (topic, _, _) in named {
            let dir = self.dir.join(topic.to_string());
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(dir = %dir.display(), error = %e, "deleting a moved segment directory failed");
                }
            }
        }
        Ok(())
    }

    /// The batch a log row points at, checked against its checksum; `None`
    /// when the segment is gone (trimmed after the caller's snapshot).
    pub fn read(&self, at: &Pointer) -> Result<Option<Vec<u8>>, StorageError> {
        let number = at.segment;
        let cached = self
            .readers
            .read()
            .expect("segment readers")
            .get(&number)
            .cloned();
        let file = match cached {
            Some(file) => file,
            None => {
                let path = self.path(number);
                let file = match File::open(&path) {
                    Ok(file) => {
                        // Consumers read a file front to back, the batches
                        // of several partitions interleaved: ask for the
                        // larger readahead of a sequential reader.
                        let _ = rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::Sequential);
                        Arc::new(ReadFile {
                            file,
                            advised_to: AtomicU64::new(0),
                        })
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(io_error("opening", &path, e)),
                };
                {
                    let mut readers = self.readers.write().expect("segment readers");
                    if readers.len() >= READ_FILES_OPEN_MAX {
                        readers.clear();
                    }
                    readers.insert(number, file.clone());
                }
                // Deleted between the open and the insert: the deleter's
                // `forget` may have run before the insert, so look again
                // rather than pin a deleted file's space in the cache.
                if !path.exists() {
                    self.forget(number);
                    return Ok(None);
                }
                file
            }
        };
        if at.length > POINTER_BYTES_MAX {
            return Err(StorageError::Corrupt(format!(
                "a pointer into {} claims {} bytes",
                self.path(number).display(),
                at.length
            )));
        }
        file.read_ahead(at.position + at.length as u64);
        let mut bytes = vec![0u8; at.length as usize];
        file.file
            .read_exact_at(&mut bytes, at.position)
            .map_err(|e| {
                StorageError::Corrupt(format!(
                    "reading {} bytes at {} of {}: {e}",
                    at.length,
                    at.position,
                    self.path(number).display()
                ))
            })?;
        if batch::checksum(&bytes) != at.checksum {
            return Err(StorageError::Corrupt(format!(
                "checksum mismatch for {} bytes at {} of {}",
                at.length,
                at.position,
                self.path(number).display()
            )));
        }
        Ok(Some(bytes))
    }

    /// An injected fault, when its switch file exists.
    fn injected(&self, switch: &str, path: &Path) -> Result<(), StorageError> {
        match &self.fault_switches {
            Some(dir) if dir.join(switch).exists() => Err(io_error(
                "injected fault",
                path,
                std::io::Error::other(switch.to_string()),
            )),
            _ => Ok(()),
        }
    }

    fn forget(&self, number: u64) {
        self.readers
            .write()
            .expect("segment readers")
            .remove(&number);
    }
}

mod appender;
mod prefill;
mod reaper;

pub use appender::SegmentAppender;
pub use reaper::SegmentReaper;

#[cfg(test)]
mod tests {
    use super::*;

    const BROKER_MAX: Roll = Roll {
        bytes_max: 1 << 30,
        age_max: Duration::from_secs(3600),
    };

    #[test]
    fn topics_with_a_retention_roll_eight_times_per_retention() {
        let roll = Roll::for_retention(BROKER_MAX, 10_000, 0);
        assert_eq!(roll.age_max, Duration::from_millis(1250));
        assert_eq!(roll.bytes_max, 1 << 30);
        let roll = Roll::for_retention(BROKER_MAX, 0, 8 << 20);
        assert_eq!(roll.bytes_max, 1 << 20);
        assert_eq!(roll.age_max, BROKER_MAX.age_max);
        // Never below the minimum age, never above the broker's maxima.
        let tiny = Roll::for_retention(BROKER_MAX, 8 * 100 - 8, 0);
        assert_eq!(tiny.age_max, SEGMENT_AGE_MIN);
        assert_eq!(Roll::for_retention(BROKER_MAX, u64::MAX, 0), BROKER_MAX);
    }

    struct Fixture {
        dir: tempfile::TempDir,
        db: Database,
        writer: SegmentAppender,
        reaper: SegmentReaper,
        applied_index: u64,
    }

    /// Where the first value of a frame starts.
    const FIRST: u64 = frames::FRAME_HEADER_BYTES;

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = Database::create(dir.path().join("test.redb")).expect("db");
        tables::create_all(&db).expect("tables");
        let (segments, replay) = Segments::recover(dir.path(), &db, None).expect("segments");
        assert!(replay.frames.is_empty());
        let segments = Arc::new(segments);
        Fixture {
            dir,
            db,
            writer: SegmentAppender::new(segments.clone()),
            reaper: SegmentReaper::new(segments),
            applied_index: 0,
        }
    }

    impl Fixture {
        /// Store `batches` (partition of topic 1, base offset, bytes) as the
        /// writer does: append, write, sync, then commit rows and lengths.
        fn commit(&mut self, roll: Roll, batches: &[(u32, u64, Vec<u8>)]) -> Vec<Pointer> {
            self.commit_to(roll, batches, true)
        }

        /// One commit's frame; its index commit only when `indexed` (else
        /// as if the broker died between the two).
        fn commit_to(
            &mut self,
            roll: Roll,
            batches: &[(u32, u64, Vec<u8>)],
            indexed: bool,
        ) -> Vec<Pointer> {
            let mut pointers = Vec::new();
            for (_, _, bytes) in batches {
                let at = self
                    .writer
                    .append(bytes, false, None, || roll)
                    .expect("append");
                pointers.push(at);
            }
            self.applied_index += 1;
            let (file, end) = self
                .writer
                .finish_frame(self.applied_index, &crate::command::encode_refs(&[]))
                .expect("frame");
            self.writer.write().expect("write");
            self.writer.sync().expect("sync");
            if !indexed {
                return pointers;
            }
            let txn = self.db.begin_write().expect("txn");
            {
                let mut meta = txn.open_table(tables::META).expect("table");
                meta.insert(tables::META_LOG_FILE, file).unwrap();
                meta.insert(tables::META_LOG_END, end).unwrap();
                meta.insert(tables::META_APPLIED_INDEX, self.applied_index)
                    .unwrap();
                let mut files = txn.open_table(tables::LOG_FILES).expect("table");
                for (number, length) in self.writer.take_rows() {
                    files.insert(number, length).unwrap();
                }
                let mut log = txn.open_table(tables::LOG).expect("table");
                let mut partitions = txn.open_table(tables::PARTITIONS).expect("table");
                let header = batch::encode(0, &[]);
                for ((partition, base, _), at) in batches.iter().zip(&pointers) {
                    let row = batch::encode_pointer(&header, *at);
                    log.insert((1, *partition, *base), row.as_slice()).unwrap();
                    partitions.insert((1, *partition), (0, base + 1)).unwrap();
                }
            }
            txn.commit().expect("commit");
            self.writer.committed();
            pointers
        }

        /// Trim partition `partition` of topic 1 below `before`, as the
        /// writer does, and commit.
        fn trim(&mut self, partition: u32, before: u64) {
            let txn = self.db.begin_write().unwrap();
            {
                let mut log = txn.open_table(tables::LOG).unwrap();
                log.retain_in((1, partition, 0)..(1, partition, before), |_, _| false)
                    .unwrap();
                self.reaper.rows_dropped();
                let partitions = txn.open_table(tables::PARTITIONS).unwrap();
                let mut files = txn.open_table(tables::LOG_FILES).unwrap();
                let live = self.writer.first_live_number();
                self.reaper
                    .collect(&log, &partitions, &mut files, live)
                    .unwrap();
            }
            txn.commit().unwrap();
            self.reaper.committed();
        }
    }

    #[test]
    fn a_segment_rolls_at_its_byte_limit_not_before() {
        let mut f = fixture();
        let roll = Roll {
            bytes_max: 100,
            age_max: Duration::from_secs(3600),
        };
        // A commit's batches share its frame, whatever their partitions.
        let at = f.commit(roll, &[(0, 0, vec![1; 40]), (1, 0, vec![2; 10])]);
        assert_eq!(
            (at[0].segment, at[1].segment, at[1].position),
            (0, 0, FIRST + 40)
        );
        // Under the limit after the frame: the next commit joins the file.
        let end = f.writer.committed_length;
        assert!(end < 100, "{end}");
        let at = f.commit(roll, &[(0, 1, vec![3; 100 - end as usize])]);
        assert_eq!((at[0].segment, at[0].position), (0, end + FIRST));
        // Past the limit: the next commit starts file 1.
        let at = f.commit(roll, &[(0, 2, vec![4; 1])]);
        assert_eq!((at[0].segment, at[0].position), (1, FIRST));
        let read = f.writer.segments().read(&at[0]).expect("read");
        assert_eq!(read, Some(vec![4; 1]));
    }

    #[test]
    fn batches_of_every_partition_share_one_file_and_one_sync() {
        let mut f = fixture();
        for partition in 0..4 {
            f.writer
                .append(&[partition as u8; 10], false, None, || BROKER_MAX)
                .unwrap();
        }
        f.writer.finish_frame(1, &[]).unwrap();
        f.writer.write().unwrap();
        assert_eq!(f.writer.sync().unwrap(), 1);
        assert_eq!(f.writer.sync().unwrap(), 0, "nothing written since");
    }

    #[test]
    fn appends_are_written_out_once_a_segment_gathers_a_mebibyte() {
        let mut f = fixture();
        let path = f.writer.segments().path(0);
        let header = FIRST as usize;
        f.writer
            .append(
                &vec![1; PENDING_BYTES_MAX - header - 1],
                false,
                None,
                || BROKER_MAX,
            )
            .unwrap();
        let len = || std::fs::metadata(&path).unwrap().len() as usize;
        assert_eq!(len(), 0, "one byte under the limit: still gathered");
        f.writer.append(&[2], false, None, || BROKER_MAX).unwrap();
        assert_eq!(len(), PENDING_BYTES_MAX, "at the limit: written out");
        f.writer.append(&[3], false, None, || BROKER_MAX).unwrap();
        assert_eq!(len(), PENDING_BYTES_MAX);
        // The header, written out with the first mebibyte, is written again
        // on its own once the frame is closed.
        let (_, end) = f.writer.finish_frame(1, &[]).unwrap();
        f.writer.write().unwrap();
        assert_eq!(len() as u64, end);
        let file = File::open(&path).unwrap();
        let found = frames::scan(&file, 0, 0, end);
        assert_eq!(found.len(), 1, "one whole frame");
    }

    #[test]
    fn start_up_cuts_uncommitted_bytes_and_deletes_unnamed_files() {
        let mut f = fixture();
        let at = f.commit(BROKER_MAX, &[(0, 0, vec![5; 64]), (1, 0, vec![6; 16])]);
        let end = f.writer.committed_length;
        let segments = f.writer.segments().clone();
        assert_eq!(segments.read(&at[0]).expect("read"), Some(vec![5; 64]));
        // A frame that never finished left bytes behind, and a file no row names.
        let path = segments.path(0);
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        file.write_all_at(&[9; 30], end).unwrap();
        let orphan = segments.path(7);
        std::fs::write(&orphan, b"never committed").unwrap();
        // The open file's end is the checkpoint's (no whole frame follows
        // it), then recorded.
        let (recovered, replay) = Segments::recover(f.dir.path(), &f.db, None).expect("recover");
        assert!(replay.frames.is_empty());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), end);
        assert!(!orphan.exists());
        assert_eq!(recovered.read(&at[1]).unwrap(), Some(vec![6; 16]));
        let recorded = f.db.begin_read().unwrap();
        let files = recorded.open_table(tables::LOG_FILES).unwrap();
        assert_eq!(files.get(0).unwrap().unwrap().value(), end);
        assert_eq!(recovered.first_free_number, 1);
        // A checksum that does not match is corruption, not data.
        let mut wrong = at[0];
        wrong.checksum ^= 1;
        assert!(matches!(
            recovered.read(&wrong),
            Err(StorageError::Corrupt(_))
        ));
        // A committed segment that is gone, or shorter than committed, is too.
        file.set_len(10).unwrap();
        assert!(matches!(
            Segments::recover(f.dir.path(), &f.db, None).map(|_| ()),
            Err(StorageError::Corrupt(_))
        ));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            Segments::recover(f.dir.path(), &f.db, None).map(|_| ()),
            Err(StorageError::Corrupt(_))
        ));
    }

    #[test]
    fn a_file_goes_once_no_partition_keeps_a_batch_in_it() {
        let mut f = fixture();
        let roll = Roll {
            bytes_max: 10,
            age_max: Duration::from_secs(3600),
        };
        // Files 0, 1, 2: partition 0 in 0 and 2, partition 1 in 1.
        let at = f.commit(roll, &[(0, 0, vec![1; 10])]);
        let at1 = f.commit(roll, &[(1, 0, vec![2; 10])]);
        let at2 = f.commit(roll, &[(0, 1, vec![3; 10])]);
        let at = [at[0], at1[0]];
        assert_eq!((at[0].segment, at[1].segment, at2[0].segment), (0, 1, 2));
        let segments = f.writer.segments().clone();
        // Partition 0 trimmed past file 0: no row points into it.
        f.trim(0, 1);
        assert!(!segments.path(0).exists());
        assert_eq!(segments.read(&at[0]).unwrap(), None);
        assert!(segments.path(1).exists(), "partition 1 still keeps file 1");
        // Partition 1 trimmed too: file 1 goes, file 2 is kept by partition 0.
        f.trim(1, 1);
        assert!(!segments.path(1).exists());
        assert!(segments.path(2).exists());
        // Everything trimmed: the active file stays.
        f.trim(0, 2);
        assert!(segments.path(2).exists());
    }

    #[test]
    fn a_failed_commit_starts_a_new_file_and_records_where_the_old_one_ends() {
        let mut f = fixture();
        f.commit(BROKER_MAX, &[(0, 0, vec![1; 10])]);
        let end = f.writer.committed_length;
        f.writer
            .append(&[4; 3], false, None, || BROKER_MAX)
            .unwrap();
        f.writer.finish_frame(2, &[]).unwrap();
        f.writer.write().unwrap();
        let segments = f.writer.segments().clone();
        assert!(std::fs::metadata(segments.path(0)).unwrap().len() > end);
        f.writer.abandon_all(true);
        assert_eq!(
            std::fs::metadata(segments.path(0)).unwrap().len(),
            end,
            "the failed frame is cut off"
        );
        let at = f.commit(BROKER_MAX, &[(0, 1, vec![5; 3])]);
        assert_eq!((at[0].segment, at[0].position), (1, FIRST));
        let end1 = f.writer.committed_length;
        let recorded = f.db.begin_read().unwrap();
        let files = recorded.open_table(tables::LOG_FILES).unwrap();
        assert_eq!(files.get(0).unwrap().unwrap().value(), end);
        assert_eq!(files.get(1).unwrap().unwrap().value(), OPEN);
        drop(files);
        Segments::recover(f.dir.path(), &f.db, None).expect("recover");
        assert_eq!(std::fs::metadata(segments.path(0)).unwrap().len(), end);
        assert_eq!(std::fs::metadata(segments.path(1)).unwrap().len(), end1);
    }

    #[test]
    fn readers_ask_for_the_next_read_ahead_only_once_they_come_within_half_of_it() {
        let mut f = fixture();
        let at = f.commit(BROKER_MAX, &[(0, 0, vec![1; 10]), (1, 0, vec![2; 10])]);
        let segments = f.writer.segments().clone();
        segments.read(&at[0]).unwrap();
        let advised = || {
            segments.readers.read().unwrap()[&0]
                .advised_to
                .load(Ordering::Relaxed)
        };
        let first_end = at[0].position + at[0].length as u64;
        assert_eq!(advised(), first_end + READ_AHEAD_BYTES);
        segments.read(&at[1]).unwrap();
        assert_eq!(
            advised(),
            first_end + READ_AHEAD_BYTES,
            "well within: no new request"
        );
        let file = &segments.readers.read().unwrap()[&0];
        file.read_ahead(first_end + READ_AHEAD_BYTES / 2 + 1);
        assert_eq!(
            file.advised_to.load(Ordering::Relaxed),
            first_end + READ_AHEAD_BYTES / 2 + 1 + READ_AHEAD_BYTES
        );
    }

    #[test]
    fn a_failed_commit_that_rolled_deletes_its_file_or_names_it_empty() {
        let roll = Roll {
            bytes_max: 10,
            age_max: Duration::from_secs(3600),
        };
        for cut in [true, false] {
            let mut f = fixture();
            f.commit(roll, &[(0, 0, vec![1; 10])]);
            let end = f.writer.committed_length;
            // The next commit rolls to file 1, then fails.
            f.writer.append(&[4; 3], false, None, || roll).unwrap();
            f.writer.finish_frame(2, &[]).unwrap();
            f.writer.write().unwrap();
            let segments = f.writer.segments().clone();
            assert!(segments.path(1).exists());
            f.writer.abandon_all(cut);
            assert_eq!(segments.path(1).exists(), !cut);
            let mut rows = f.writer.take_rows();
            rows.sort();
            let expected = if cut {
                vec![(0, end)]
            } else {
                vec![(0, end), (1, 0)]
            };
            assert_eq!(rows, expected, "cut: {cut}");
        }
    }

    #[test]
    fn start_up_finds_the_frames_past_the_checkpoint_in_order() {
        let mut f = fixture();
        let roll = Roll {
            bytes_max: 100,
            age_max: Duration::from_secs(3600),
        };
        f.commit(roll, &[(0, 0, vec![1; 10])]);
        let checkpoint = f.writer.committed_length;
        // Two frames synced but never indexed, the second in a new file,
        // then a torn one.
        f.commit_to(roll, &[(0, 1, vec![2; 90])], false);
        f.writer.committed();
        let at = f.commit_to(roll, &[(0, 2, vec![3; 5])], false);
        f.writer.committed();
        assert_eq!(at[0].segment, 1);
        let torn_at = f.writer.committed_length;
        let segments = f.writer.segments().clone();
        std::fs::OpenOptions::new()
            .write(true)
            .open(segments.path(1))
            .unwrap()
            .write_all_at(&[0x4d, 0x53, 0x51], torn_at)
            .unwrap();
        let (_, replay) = Segments::recover(f.dir.path(), &f.db, None).expect("recover");
        assert_eq!(replay.from, Some((0, checkpoint)));
        let found: Vec<(u64, u64, u64)> = replay
            .frames
            .iter()
            .map(|fr| (fr.file, fr.start, fr.header.applied_index))
            .collect();
        assert_eq!(found, vec![(0, checkpoint, 2), (1, 0, 3)]);
        assert_eq!(
            std::fs::metadata(segments.path(1)).unwrap().len(),
            torn_at,
            "the torn bytes are cut"
        );
    }

    /// A fixture whose writer prefills, or `None` (with why) where the
    /// temporary directory is in memory and prefilling is off.
    fn prefilling_fixture() -> Option<Fixture> {
        let mut f = fixture();
        f.writer = SegmentAppender::new(f.writer.segments().clone()).with_prefill(true);
        if f.writer.prefill_ready().is_none() {
            eprintln!("skipped: the temporary directory is in memory, where nothing is prefilled");
            return None;
        }
        f.writer.assume_load(prefill::WriterLoad::steady(0.1));
        Some(f)
    }

    /// Commit until the active file is a quarter of `roll` long, then
    /// once more (a commit decides as it starts its frame), and wait for
    /// the next file to be prefilled.
    fn wait_for_prefill(f: &mut Fixture, roll: Roll) {
        f.commit(roll, &[(0, 0, vec![1; roll.bytes_max as usize / 4])]);
        f.commit(roll, &[(1, 0, vec![1])]);
        let deadline = Instant::now() + Duration::from_secs(30);
        while f.writer.prefill_ready() != Some(true) {
            assert!(Instant::now() < deadline, "no prefilled file in 30 s");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    const PREFILL_ROLL: Roll = Roll {
        bytes_max: 64 << 10,
        age_max: Duration::from_secs(3600),
    };

    /// The roll size in whole prefill writes.
    const PREFILLED_BYTES: u64 = PREFILL_ROLL
        .bytes_max
        .next_multiple_of(prefill::PREFILL_WRITE_BYTES as u64);

    #[test]
    fn a_latency_bound_writer_rolls_into_a_prefilled_file_and_start_up_cuts_its_zeros() {
        let Some(mut f) = prefilling_fixture() else {
            return;
        };
        wait_for_prefill(&mut f, PREFILL_ROLL);
        // File 0 reaches its roll size; the next commit goes to file 1,
        // which is the prefilled file, zeros past the frame.
        f.commit(PREFILL_ROLL, &[(0, 1, vec![2; 48 << 10])]);
        let at = f.commit(PREFILL_ROLL, &[(0, 2, vec![3; 1000])]);
        assert_eq!(at[0].segment, 1);
        let segments = f.writer.segments().clone();
        let path = segments.path(1);
        let len = || std::fs::metadata(&path).unwrap().len();
        assert_eq!(len(), PREFILLED_BYTES, "made from the prefilled file");
        assert!(!segments.dir.join(prefill::PREFILL_FILE_NAME).exists());
        assert_eq!(segments.read(&at[0]).expect("read"), Some(vec![3; 1000]));
        let end = f.writer.committed_length;
        // The broker dies: no clean stop trims the file. Start-up finds
        // the frame, cuts the zeros after it, and reads the batch.
        let crashed = std::mem::replace(&mut f.writer, SegmentAppender::new(segments));
        std::mem::forget(crashed);
        let (recovered, _) = Segments::recover(f.dir.path(), &f.db, None).expect("recover");
        assert_eq!(len(), end);
        assert_eq!(recovered.read(&at[0]).expect("read"), Some(vec![3; 1000]));
    }

    #[test]
    fn a_writer_busy_most_of_the_time_grows_its_files() {
        let Some(mut f) = prefilling_fixture() else {
            return;
        };
        f.writer.assume_load(prefill::WriterLoad::steady(
            prefill::PREFILL_WRITER_BUSY_FRACTION_MAX,
        ));
        f.commit(PREFILL_ROLL, &[(0, 0, vec![1; 16 << 10])]);
        f.commit(PREFILL_ROLL, &[(0, 1, vec![2; 48 << 10])]);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(f.writer.prefill_ready(), Some(false));
        let at = f.commit(PREFILL_ROLL, &[(0, 2, vec![3; 10])]);
        assert_eq!(at[0].segment, 1);
        let path = f.writer.segments().path(1);
        let len = std::fs::metadata(path).unwrap().len();
        assert_eq!(len, f.writer.committed_length, "grown, not prefilled");
    }

    #[test]
    fn prefilled_files_are_cut_to_their_frames_when_closed_or_at_a_clean_stop() {
        let Some(mut f) = prefilling_fixture() else {
            return;
        };
        wait_for_prefill(&mut f, PREFILL_ROLL);
        f.commit(PREFILL_ROLL, &[(0, 1, vec![2; 48 << 10])]);
        // File 1 (prefilled) asks for file 2 and fills to its roll size.
        wait_for_prefill(&mut f, PREFILL_ROLL);
        f.commit(PREFILL_ROLL, &[(0, 3, vec![4; 48 << 10])]);
        let file_1_end = f.writer.committed_length;
        assert!(file_1_end > PREFILL_ROLL.bytes_max, "{file_1_end}");
        // Rolling to file 2 trims file 1 in the background.
        let at = f.commit(PREFILL_ROLL, &[(0, 4, vec![5; 10])]);
        assert_eq!(at[0].segment, 2);
        let segments = f.writer.segments().clone();
        let len = |n| std::fs::metadata(segments.path(n)).unwrap().len();
        assert_eq!(len(2), PREFILLED_BYTES);
        let deadline = Instant::now() + Duration::from_secs(30);
        while len(1) != file_1_end {
            assert!(Instant::now() < deadline, "file 1 still {} bytes", len(1));
            std::thread::sleep(Duration::from_millis(5));
        }
        // A clean stop cuts the active file to its committed frames.
        let end = f.writer.committed_length;
        drop(f.writer);
        assert_eq!(len(2), end);
    }

    #[test]
    fn per_partition_files_of_the_earlier_layout_are_moved_without_copying() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("test.redb")).unwrap();
        tables::create_all(&db).unwrap();
        // The earlier layout: topic 3 partition 1, segments at offsets 0 and 5.
        let old_dir = dir.path().join(SEGMENTS_DIR).join("3").join("1");
        std::fs::create_dir_all(&old_dir).unwrap();
        let header = batch::encode(0, &[]);
        let txn = db.begin_write().unwrap();
        let mut pointers = Vec::new();
        {
            let mut named = txn.open_table(tables::SEGMENTS).unwrap();
            let mut log = txn.open_table(tables::LOG).unwrap();
            let mut partitions = txn.open_table(tables::PARTITIONS).unwrap();
            for (base, bytes) in [(0u64, vec![1u8; 20]), (5, vec![2u8; 7])] {
                // The file holds one committed batch and torn bytes after it.
                let mut on_disk = bytes.clone();
                on_disk.extend_from_slice(&[0xee; 4]);
                std::fs::write(old_dir.join(format!("{base:020}.seg")), &on_disk).unwrap();
                named.insert((3, 1, base), 0).unwrap();
                let at = Pointer {
                    segment: base,
                    position: 0,
                    length: bytes.len() as u32,
                    checksum: batch::checksum(&bytes),
                    has_keys: false,
                };
                log.insert((3, 1, base), batch::encode_pointer(&header, at).as_slice())
                    .unwrap();
                pointers.push((base, bytes));
            }
            partitions.insert((3, 1), (0, 6)).unwrap();
        }
        txn.commit().unwrap();
        let (segments, _) = Segments::recover(dir.path(), &db, None).expect("recover");
        assert!(!dir.path().join(SEGMENTS_DIR).join("3").exists());
        let txn = db.begin_read().unwrap();
        assert!(txn
            .open_table(tables::SEGMENTS)
            .unwrap()
            .is_empty()
            .unwrap());
        let log = txn.open_table(tables::LOG).unwrap();
        for (i, (base, bytes)) in pointers.iter().enumerate() {
            let row = log.get((3, 1, *base)).unwrap().unwrap();
            let at = batch::pointer(row.value()).unwrap().unwrap();
            assert_eq!(at.segment, i as u64);
            assert_eq!(segments.read(&at).unwrap().as_ref(), Some(bytes));
            // Torn bytes past the last batch are cut as for any file.
            let len = std::fs::metadata(segments.path(i as u64)).unwrap().len();
            assert_eq!(len, bytes.len() as u64);
        }
        assert_eq!(segments.first_free_number, 2);
    }
}
