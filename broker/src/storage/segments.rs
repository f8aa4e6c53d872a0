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
//! Size: over 1,000 lines, about 400 of them tests (files, reads,
//! start-up and the move from the earlier layout, trims). The command-log
//! step of the performance issue reshapes this module; it is split then.
//!
//! Invariants:
//! - redb stays the one source of truth. A log row holds a [`Pointer`] (file
//!   number, position, length, checksum). The `log_files` table names each
//!   file: a row written by the commit that starts it, holding [`OPEN`]
//!   while it is appended to and its committed length once a later commit
//!   closed it (rolled past it, or after a failed commit). So an append
//!   writes no `log_files` row.
//! - Bytes are written and synced before the commit that points at them: a
//!   committed pointer never points at bytes that are not on disk.
//! - Bytes past a file's committed length belong to a commit that failed or
//!   was cut short. After a failed commit or a restart the appender starts a
//!   new file, so nothing is appended behind them, and start-up
//!   ([`Segments::recover`]) cuts them off and deletes files no row names.
//!   The open file's committed length is where the last batch a row points
//!   at in it ends.
//! - A partition's rows point into files in the order of their offsets, so
//!   no row points below the oldest file that some partition's first row
//!   points into. Files below it (and below the active one) are deleted
//!   ([`SegmentReaper`]) after the commit that dropped their rows, made
//!   durable even under `durability = none`. A reader that still holds the
//!   file open reads on; one that opens it later finds nothing, which means
//!   "trimmed".
//! - Per-topic retention still bounds the disk: the active file rolls when
//!   it is older or larger than the roll of any topic appending to it
//!   ([`Roll::for_retention`]). A file lives as long as its longest-kept
//!   batch.
//! - Data directories of the earlier layout (one file sequence per
//!   partition, named in the `segments` table) are moved into the broker's
//!   sequence at start-up by hard links, in a durable commit; no byte is
//!   copied.

use super::batch::{self, Pointer};
use super::{tables, StorageError};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

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

/// The segment files of a data directory, shared by the writer and readers.
pub struct Segments {
    dir: PathBuf,
    readers: RwLock<HashMap<u64, Arc<File>>>,
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
    ) -> Result<Segments, StorageError> {
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
        segments.move_partition_files(db)?;
        let (committed, open) = committed_lengths(db)?;
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
        Ok(segments)
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
                        Arc::new(file)
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
        let mut bytes = vec![0u8; at.length as usize];
        file.read_exact_at(&mut bytes, at.position).map_err(|e| {
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

/// The file being appended to.
struct Active {
    number: u64,
    file: Arc<File>,
    /// Length including `pending`.
    length: u64,
    /// Appended bytes not yet written to the file: one write per commit,
    /// however many batches.
    pending: Vec<u8>,
    opened: Instant,
}

/// The writer's side: appends batches to the active file and makes them
/// durable before the writer commits pointers to them.
pub struct SegmentAppender {
    segments: Arc<Segments>,
    active: Option<Active>,
    next_number: u64,
    /// Files written to since the last sync.
    dirty: Vec<(u64, Arc<File>)>,
    /// A file was started since the last sync: its directory entry too.
    dir_dirty: bool,
    /// `log_files` rows for the coming commit: files started (OPEN) and
    /// closed (their committed length).
    rows: Vec<(u64, u64)>,
    /// Files closed by a failed commit, with their committed lengths: rows
    /// for the next commit that succeeds.
    closed_by_failure: Vec<(u64, u64)>,
    /// The active file's length after the last commit that succeeded.
    committed_length: u64,
    /// Bytes written to files since [`Self::take_written`].
    written: u64,
}

impl SegmentAppender {
    pub fn new(segments: Arc<Segments>) -> SegmentAppender {
        let next_number = segments.first_free_number;
        SegmentAppender {
            segments,
            active: None,
            next_number,
            dirty: Vec::new(),
            dir_dirty: false,
            rows: Vec::new(),
            closed_by_failure: Vec::new(),
            committed_length: 0,
            written: 0,
        }
    }

    pub fn segments(&self) -> &Arc<Segments> {
        &self.segments
    }

    /// The number of the file appends go to next (files below it, and only
    /// those, may ever be deleted).
    pub fn first_live_number(&self) -> u64 {
        self.active.as_ref().map_or(self.next_number, |a| a.number)
    }

    /// Append a batch to the active file, starting a new one when the
    /// appending topic's `roll` says the active file is old or big enough.
    /// Returns where the batch will be once [`Self::write`] has run.
    pub fn append(
        &mut self,
        bytes: &[u8],
        has_keys: bool,
        roll: impl FnOnce() -> Roll,
    ) -> Result<Pointer, StorageError> {
        let due = self.active.as_ref().is_none_or(|a| {
            a.length > 0 && {
                let roll = roll();
                a.length >= roll.bytes_max || a.opened.elapsed() >= roll.age_max
            }
        });
        if due {
            if let Some(mut old) = self.active.take() {
                self.written += write_out(&self.segments, &mut self.dirty, &mut old)?;
                self.rows.push((old.number, old.length));
            }
            self.active = Some(self.create()?);
        }
        let active = self.active.as_mut().expect("an active segment");
        let pointer = Pointer {
            segment: active.number,
            position: active.length,
            length: bytes.len() as u32,
            checksum: batch::checksum(bytes),
            has_keys,
        };
        active.pending.extend_from_slice(bytes);
        active.length += bytes.len() as u64;
        if active.pending.len() >= PENDING_BYTES_MAX {
            self.written += write_out(&self.segments, &mut self.dirty, active)?;
        }
        Ok(pointer)
    }

    /// The `log_files` rows the coming commit writes: files it started, and
    /// files it (or a failed commit before it) closed.
    pub fn take_rows(&mut self) -> Vec<(u64, u64)> {
        let mut rows = std::mem::take(&mut self.rows);
        rows.extend(self.closed_by_failure.iter().copied());
        rows
    }

    /// Write every appended batch to its file.
    pub fn write(&mut self) -> Result<(), StorageError> {
        if let Some(active) = self.active.as_mut() {
            self.written += write_out(&self.segments, &mut self.dirty, active)?;
        }
        Ok(())
    }

    /// Bytes written to files since the last call.
    pub fn take_written(&mut self) -> u64 {
        std::mem::take(&mut self.written)
    }

    fn create(&mut self) -> Result<Active, StorageError> {
        let number = self.next_number;
        self.next_number += 1;
        let path = self.segments.path(number);
        // A number above every named file: a file already there holds
        // nothing committed (a failed commit's bytes).
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| io_error("creating", &path, e))?;
        tracing::debug!(file = %path.display(), "new segment");
        self.dir_dirty = true;
        self.rows.push((number, OPEN));
        Ok(Active {
            number,
            file: Arc::new(file),
            length: 0,
            pending: Vec::new(),
            opened: Instant::now(),
        })
    }

    /// Make every write since the last sync durable; returns the files
    /// synced.
    pub fn sync(&mut self) -> Result<usize, StorageError> {
        // One after another (there are rarely two: a roll): concurrent
        // fdatasyncs of several files took 3-4x as long on ext4.
        let mut synced = 0;
        for (number, file) in &self.dirty {
            let path = self.segments.path(*number);
            self.segments.injected(FAULT_SYNC, &path)?;
            file.sync_data()
                .map_err(|e| io_error("syncing", &path, e))?;
            synced += 1;
        }
        if self.dir_dirty {
            File::open(&self.segments.dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io_error("syncing", &self.segments.dir, e))?;
            self.dir_dirty = false;
        }
        self.dirty.clear();
        Ok(synced)
    }

    /// The commit succeeded.
    pub fn committed(&mut self) {
        self.rows.clear();
        self.closed_by_failure.clear();
        if let Some(active) = &self.active {
            self.committed_length = active.length;
        }
    }

    /// A commit failed: start a new file, so nothing is appended behind
    /// bytes of unknown state; the next commit that succeeds records where
    /// the abandoned file's committed bytes end. Files written since the
    /// last sync stay on the list to sync: earlier commits that were not
    /// synced (`durability = none`) still point into them.
    pub fn abandon_all(&mut self) {
        // Files this commit started are named by no row: start-up deletes them.
        let started: Vec<u64> = self
            .rows
            .iter()
            .filter(|(_, length)| *length == OPEN)
            .map(|(n, _)| *n)
            .collect();
        self.rows.clear();
        if let Some(active) = self.active.take() {
            if !started.contains(&active.number) {
                self.closed_by_failure
                    .push((active.number, self.committed_length));
            }
        }
        self.committed_length = 0;
    }
}

/// Write a file's pending bytes; returns how many.
fn write_out(
    segments: &Segments,
    dirty: &mut Vec<(u64, Arc<File>)>,
    active: &mut Active,
) -> Result<u64, StorageError> {
    if active.pending.is_empty() {
        return Ok(0);
    }
    let written = active.pending.len() as u64;
    let path = segments.path(active.number);
    segments.injected(FAULT_WRITE, &path)?;
    let at = active.length - active.pending.len() as u64;
    active
        .file
        .write_all_at(&active.pending, at)
        .map_err(|e| io_error("writing", &path, e))?;
    active.pending.clear();
    if !dirty.iter().any(|(n, _)| *n == active.number) {
        dirty.push((active.number, active.file.clone()));
    }
    Ok(written)
}

type FilesTable<'t> = redb::Table<'t, u64, u64>;

/// The writer's side: once trims or topic deletes dropped rows, finds the
/// files no row points into any more, drops their `log_files` rows, and
/// deletes them once that commit succeeded.
pub struct SegmentReaper {
    segments: Arc<Segments>,
    doomed: Vec<u64>,
    /// Rows were dropped in this commit: look for files to delete.
    rows_dropped: bool,
}

impl SegmentReaper {
    pub fn new(segments: Arc<Segments>) -> SegmentReaper {
        SegmentReaper {
            segments,
            doomed: Vec::new(),
            rows_dropped: false,
        }
    }

    pub fn segments(&self) -> &Arc<Segments> {
        &self.segments
    }

    /// Log rows were removed (a trim, a topic delete).
    pub fn rows_dropped(&mut self) {
        self.rows_dropped = true;
    }

    /// After a commit's commands: drop the files below both the oldest file
    /// a partition's first row points into and `first_live_number`.
    pub fn collect(
        &mut self,
        log: &impl ReadableTable<(u32, u32, u64), &'static [u8]>,
        partitions: &impl ReadableTable<(u32, u32), (u64, u64)>,
        files: &mut FilesTable,
        first_live_number: u64,
    ) -> Result<(), StorageError> {
        if !std::mem::take(&mut self.rows_dropped) {
            return Ok(());
        }
        let mut oldest = first_live_number;
        for entry in partitions.iter()? {
            let (topic, partition) = entry?.0.value();
            for row in log.range((topic, partition, 0)..=(topic, partition, u64::MAX))? {
                // Rows of older versions may hold their batch: not in a file.
                if let Some(at) = batch::pointer(row?.1.value()).map_err(StorageError::Corrupt)? {
                    oldest = oldest.min(at.segment);
                    break;
                }
            }
        }
        let doomed: Vec<u64> = files
            .range(..oldest)?
            .map(|e| e.map(|(k, _)| k.value()))
            .collect::<Result<_, _>>()?;
        for number in doomed {
            files.remove(number)?;
            self.doomed.push(number);
        }
        Ok(())
    }

    /// Whether the coming commit deletes files (it must then be durable).
    pub fn deletes_files(&self) -> bool {
        !self.doomed.is_empty()
    }

    /// The commit succeeded: delete the files it dropped.
    pub fn committed(&mut self) {
        for number in std::mem::take(&mut self.doomed) {
            let path = self.segments.path(number);
            match std::fs::remove_file(&path) {
                Ok(()) => tracing::debug!(file = %path.display(), "deleted a trimmed segment"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "deleting a trimmed segment failed; start-up retries")
                }
            }
            self.segments.forget(number);
        }
    }

    /// The commit failed: its drops did not happen (the next trim looks
    /// again).
    pub fn failed(&mut self) {
        self.doomed.clear();
        self.rows_dropped = true;
    }
}

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
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = Database::create(dir.path().join("test.redb")).expect("db");
        tables::create_all(&db).expect("tables");
        let segments = Arc::new(Segments::recover(dir.path(), &db, None).expect("segments"));
        Fixture {
            dir,
            db,
            writer: SegmentAppender::new(segments.clone()),
            reaper: SegmentReaper::new(segments),
        }
    }

    impl Fixture {
        /// Store `batches` (partition of topic 1, base offset, bytes) as the
        /// writer does: append, write, sync, then commit rows and lengths.
        fn commit(&mut self, roll: Roll, batches: &[(u32, u64, Vec<u8>)]) -> Vec<Pointer> {
            let mut pointers = Vec::new();
            for (_, _, bytes) in batches {
                let at = self.writer.append(bytes, false, || roll).expect("append");
                pointers.push(at);
            }
            self.writer.write().expect("write");
            self.writer.sync().expect("sync");
            let txn = self.db.begin_write().expect("txn");
            {
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
        // 99 bytes: one under the limit, the next batch joins the file,
        // whatever its partition.
        let at = f.commit(roll, &[(0, 0, vec![1; 99]), (1, 0, vec![2; 10])]);
        assert_eq!((at[0].segment, at[1].segment, at[1].position), (0, 0, 99));
        // 109 bytes: at or past the limit, the next batch starts file 1.
        let at = f.commit(roll, &[(0, 1, vec![3; 10])]);
        assert_eq!((at[0].segment, at[0].position), (1, 0));
        // Exactly at the limit also rolls.
        let mut g = fixture();
        let at = g.commit(roll, &[(0, 0, vec![1; 100]), (0, 1, vec![2; 1])]);
        assert_eq!((at[0].segment, at[1].segment), (0, 1));
        let read = g.writer.segments().read(&at[1]).expect("read");
        assert_eq!(read, Some(vec![2; 1]));
    }

    #[test]
    fn batches_of_every_partition_share_one_file_and_one_sync() {
        let mut f = fixture();
        for partition in 0..4 {
            f.writer
                .append(&[partition as u8; 10], false, || BROKER_MAX)
                .unwrap();
        }
        f.writer.write().unwrap();
        assert_eq!(f.writer.sync().unwrap(), 1);
        assert_eq!(f.writer.sync().unwrap(), 0, "nothing written since");
    }

    #[test]
    fn appends_are_written_out_once_a_segment_gathers_a_mebibyte() {
        let mut f = fixture();
        let path = f.writer.segments().path(0);
        f.writer
            .append(&vec![1; PENDING_BYTES_MAX - 1], false, || BROKER_MAX)
            .unwrap();
        let len = || std::fs::metadata(&path).unwrap().len() as usize;
        assert_eq!(len(), 0, "one byte under the limit: still gathered");
        f.writer.append(&[2], false, || BROKER_MAX).unwrap();
        assert_eq!(len(), PENDING_BYTES_MAX, "at the limit: written out");
        f.writer.append(&[3], false, || BROKER_MAX).unwrap();
        assert_eq!(len(), PENDING_BYTES_MAX);
        f.writer.write().unwrap();
        assert_eq!(len(), PENDING_BYTES_MAX + 1);
    }

    #[test]
    fn start_up_cuts_uncommitted_bytes_and_deletes_unnamed_files() {
        let mut f = fixture();
        let at = f.commit(BROKER_MAX, &[(0, 0, vec![5; 64]), (1, 0, vec![6; 16])]);
        let segments = f.writer.segments().clone();
        assert_eq!(segments.read(&at[0]).expect("read"), Some(vec![5; 64]));
        // A commit that never finished left bytes behind, and a file no row names.
        let path = segments.path(0);
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        file.write_all_at(&[9; 30], 80).unwrap();
        let orphan = segments.path(7);
        std::fs::write(&orphan, b"never committed").unwrap();
        // The open file's end is found from the rows, then recorded.
        let recovered = Segments::recover(f.dir.path(), &f.db, None).expect("recover");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 80);
        assert!(!orphan.exists());
        assert_eq!(recovered.read(&at[1]).unwrap(), Some(vec![6; 16]));
        let recorded = f.db.begin_read().unwrap();
        let files = recorded.open_table(tables::LOG_FILES).unwrap();
        assert_eq!(files.get(0).unwrap().unwrap().value(), 80);
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
            Segments::recover(f.dir.path(), &f.db, None),
            Err(StorageError::Corrupt(_))
        ));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            Segments::recover(f.dir.path(), &f.db, None),
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
        let at = f.commit(roll, &[(0, 0, vec![1; 10]), (1, 0, vec![2; 10])]);
        let at2 = f.commit(roll, &[(0, 1, vec![3; 10])]);
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
        f.writer.append(&[4; 3], false, || BROKER_MAX).unwrap();
        f.writer.write().unwrap();
        f.writer.abandon_all();
        let at = f.commit(BROKER_MAX, &[(0, 1, vec![5; 3])]);
        assert_eq!((at[0].segment, at[0].position), (1, 0));
        let recorded = f.db.begin_read().unwrap();
        let files = recorded.open_table(tables::LOG_FILES).unwrap();
        assert_eq!(files.get(0).unwrap().unwrap().value(), 10);
        assert_eq!(files.get(1).unwrap().unwrap().value(), OPEN);
        drop(files);
        let segments = f.writer.segments().clone();
        assert_eq!(std::fs::metadata(segments.path(0)).unwrap().len(), 13);
        Segments::recover(f.dir.path(), &f.db, None).expect("recover");
        assert_eq!(std::fs::metadata(segments.path(0)).unwrap().len(), 10);
        assert_eq!(std::fs::metadata(segments.path(1)).unwrap().len(), 3);
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
        let segments = Segments::recover(dir.path(), &db, None).expect("recover");
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
