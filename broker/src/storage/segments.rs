//! The log's batch bytes, in append-only segment files, one directory per
//! partition: `<data dir>/segments/<topic id>/<partition>/<base offset>.seg`,
//! the base offset being that of the segment's first batch.
//!
//! Why files beside redb: redb grows its file by doubling while it is under
//! one region (4 GiB) and gives space back only when the last half of it is
//! free, so a log kept inside it takes anywhere from about 1.3 to 2.6 times
//! its retained size. A segment is deleted whole once retention has trimmed
//! every batch in it, so the disk follows the retained data.
//!
//! Size: over 800 lines (files, index, reads, trims and their tests). The
//! next step of the performance issue turns segments into the command log
//! (one file per broker, framed commands), which changes what this module
//! holds; it is split then rather than twice.
//!
//! Each payload byte is written once: the writer appends every batch a
//! group commit stores to its partition's segment ([`SegmentAppender`]),
//! writes and fdatasyncs the touched files, and only then commits the redb
//! transaction that indexes them (a pointer row per batch, and each
//! segment's new length).
//!
//! Invariants:
//! - redb stays the one source of truth. A log row holds a [`Pointer`] into
//!   a segment, and the `segments` table names each segment (a row written
//!   by the commit that starts it). A segment's committed length is where
//!   the last batch a row points at in it ends, so appends touch no
//!   `segments` row: one table fewer rewritten per commit.
//! - Bytes are written and synced before the commit that points at them: a
//!   committed pointer never points at bytes that are not on disk.
//! - Bytes past a segment's committed length belong to a commit that failed
//!   or was cut short. After a failed commit or a restart each partition
//!   starts a new segment, so nothing is appended behind them, and start-up
//!   ([`Segments::recover`]) cuts them off and deletes files no row names.
//! - A file is deleted ([`SegmentReaper`]) only after the commit that
//!   removed its row, made durable even under `durability = none`, and only
//!   once every batch in it has been trimmed (or its topic deleted). A reader that still holds the file open reads on;
//!   one that opens it later finds nothing, which means "trimmed".

use super::batch::{self, Pointer};
use super::{tables, StorageError};
use redb::{Database, ReadableDatabase, ReadableTable};
use std::collections::{BTreeMap, HashMap, HashSet};
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
/// Segment fsyncs run at once.
const SYNC_THREADS_MAX: usize = 8;
/// Largest batch a pointer may claim (a batch is at most 32 MiB): a longer
/// one is corruption, not a reason to allocate.
const POINTER_BYTES_MAX: u32 = 64 << 20;
/// Bytes gathered for one segment before they are written out.
const PENDING_BYTES_MAX: usize = 1 << 20;
/// Segment files kept open for reading; past this the cache starts over.
const READ_FILES_OPEN_MAX: usize = 1024;
const SEGMENT_FILE_SUFFIX: &str = "seg";
/// Fault switch (tests only): segment writes fail while it exists.
const FAULT_WRITE: &str = "fail-segment-write";
/// Fault switch (tests only): segment fsyncs fail while it exists.
const FAULT_SYNC: &str = "fail-segment-sync";

/// One segment file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SegmentId {
    pub topic: u32,
    pub partition: u32,
    /// Base offset of the segment's first batch.
    pub base: u64,
}

/// When the writer starts a new segment for a partition.
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

/// Each named segment's committed length: where the last batch a `log` row
/// points at in it ends. The `segments` table only names segments (a row
/// when one starts), so a commit that appends writes no row there.
fn committed_lengths(db: &Database) -> Result<BTreeMap<SegmentId, u64>, StorageError> {
    let txn = db.begin_read()?;
    let table = txn.open_table(tables::SEGMENTS)?;
    let log = txn.open_table(tables::LOG)?;
    let mut ids = Vec::new();
    for entry in table.iter()? {
        let (topic, partition, base) = entry?.0.value();
        ids.push(SegmentId {
            topic,
            partition,
            base,
        });
    }
    let mut lengths = BTreeMap::new();
    for (i, id) in ids.iter().enumerate() {
        // A segment holds the batches from its base to the next one's.
        let next = ids
            .get(i + 1)
            .filter(|n| (n.topic, n.partition) == (id.topic, id.partition))
            .map_or(u64::MAX, |n| n.base);
        let mut length = 0;
        for row in log
            .range((id.topic, id.partition, id.base)..(id.topic, id.partition, next))?
            .rev()
        {
            // Rows of older versions may hold their batch: not in a file.
            if let Some(at) = batch::pointer(row?.1.value()).map_err(StorageError::Corrupt)? {
                if at.segment == id.base {
                    length = at.position + at.length as u64;
                    break;
                }
            }
        }
        lengths.insert(*id, length);
    }
    Ok(lengths)
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> StorageError {
    StorageError::Redb(format!("{what} {}: {e}", path.display()))
}

/// The segment files of a data directory, shared by the writer and readers.
pub struct Segments {
    dir: PathBuf,
    readers: RwLock<HashMap<SegmentId, Arc<File>>>,
    /// For tests: the directory of fault switch files (see [`super::faults`]).
    fault_switches: Option<PathBuf>,
}

impl Segments {
    /// Bring the segment files in line with the committed `segments` table
    /// and return them ready for use: bytes past a committed length are cut
    /// off, files without a row are deleted, and a row without its file (or
    /// with a file shorter than committed) is corruption.
    pub fn recover(
        data_dir: &Path,
        db: &Database,
        fault_switches: Option<PathBuf>,
    ) -> Result<Segments, StorageError> {
        let segments = Segments {
            dir: data_dir.join(SEGMENTS_DIR),
            readers: RwLock::new(HashMap::new()),
            fault_switches,
        };
        if !segments.dir.exists() {
            std::fs::create_dir_all(&segments.dir)
                .and_then(|_| File::open(data_dir)?.sync_all())
                .map_err(|e| io_error("creating", &segments.dir, e))?;
        }
        let committed = committed_lengths(db)?;
        let mut found = HashSet::new();
        for (id, path) in segments.files_on_disk()? {
            let Some(&length) = committed.get(&id) else {
                tracing::info!(file = %path.display(), "deleting a segment no commit refers to");
                std::fs::remove_file(&path).map_err(|e| io_error("deleting", &path, e))?;
                continue;
            };
            found.insert(id);
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
        if let Some(missing) = committed.keys().find(|id| !found.contains(id)) {
            return Err(StorageError::Corrupt(format!(
                "segment file {} is missing",
                segments.path(*missing).display()
            )));
        }
        Ok(segments)
    }

    pub fn path(&self, id: SegmentId) -> PathBuf {
        self.partition_dir(id.topic, id.partition)
            .join(format!("{:020}.{SEGMENT_FILE_SUFFIX}", id.base))
    }

    fn partition_dir(&self, topic: u32, partition: u32) -> PathBuf {
        self.dir.join(topic.to_string()).join(partition.to_string())
    }

    /// Every `<topic>/<partition>/<base>.seg` file under the segments directory.
    fn files_on_disk(&self) -> Result<Vec<(SegmentId, PathBuf)>, StorageError> {
        let list = |dir: &Path| -> Result<Vec<(String, PathBuf)>, StorageError> {
            let mut out = Vec::new();
            for entry in std::fs::read_dir(dir).map_err(|e| io_error("listing", dir, e))? {
                let entry = entry.map_err(|e| io_error("listing", dir, e))?;
                out.push((
                    entry.file_name().to_string_lossy().into_owned(),
                    entry.path(),
                ));
            }
            Ok(out)
        };
        let mut files = Vec::new();
        for (topic, topic_dir) in list(&self.dir)? {
            let Ok(topic) = topic.parse::<u32>() else {
                continue;
            };
            for (partition, partition_dir) in list(&topic_dir)? {
                let Ok(partition) = partition.parse::<u32>() else {
                    continue;
                };
                for (name, path) in list(&partition_dir)? {
                    let base = name
                        .strip_suffix(SEGMENT_FILE_SUFFIX)
                        .and_then(|n| n.strip_suffix('.'))
                        .and_then(|n| n.parse::<u64>().ok());
                    if let Some(base) = base {
                        let id = SegmentId {
                            topic,
                            partition,
                            base,
                        };
                        files.push((id, path));
                    }
                }
            }
        }
        Ok(files)
    }

    /// The batch a log row points at, checked against its checksum; `None`
    /// when the segment is gone (trimmed after the caller's snapshot).
    pub fn read(
        &self,
        topic: u32,
        partition: u32,
        at: &Pointer,
    ) -> Result<Option<Vec<u8>>, StorageError> {
        let id = SegmentId {
            topic,
            partition,
            base: at.segment,
        };
        let cached = self
            .readers
            .read()
            .expect("segment readers")
            .get(&id)
            .cloned();
        let file = match cached {
            Some(file) => file,
            None => {
                let path = self.path(id);
                let file = match File::open(&path) {
                    Ok(file) => Arc::new(file),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(io_error("opening", &path, e)),
                };
                {
                    let mut readers = self.readers.write().expect("segment readers");
                    if readers.len() >= READ_FILES_OPEN_MAX {
                        readers.clear();
                    }
                    readers.insert(id, file.clone());
                }
                // Deleted between the open and the insert: the deleter's
                // `forget` may have run before the insert, so look again
                // rather than pin a deleted file's space in the cache.
                if !path.exists() {
                    self.forget(|cached| *cached != id);
                    return Ok(None);
                }
                file
            }
        };
        if at.length > POINTER_BYTES_MAX {
            return Err(StorageError::Corrupt(format!(
                "a pointer into {} claims {} bytes",
                self.path(id).display(),
                at.length
            )));
        }
        let mut bytes = vec![0u8; at.length as usize];
        file.read_exact_at(&mut bytes, at.position).map_err(|e| {
            StorageError::Corrupt(format!(
                "reading {} bytes at {} of {}: {e}",
                at.length,
                at.position,
                self.path(id).display()
            ))
        })?;
        if batch::checksum(&bytes) != at.checksum {
            return Err(StorageError::Corrupt(format!(
                "checksum mismatch for {} bytes at {} of {}",
                at.length,
                at.position,
                self.path(id).display()
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

    fn forget(&self, keep: impl Fn(&SegmentId) -> bool) {
        self.readers
            .write()
            .expect("segment readers")
            .retain(|id, _| keep(id));
    }
}

/// The segment a partition appends to.
struct Active {
    base: u64,
    file: Arc<File>,
    /// Length including `pending`.
    length: u64,
    /// Appended bytes not yet written to the file: one write per segment
    /// and commit, however many batches.
    pending: Vec<u8>,
    opened: Instant,
    roll: Roll,
}

/// The writer's side: appends batches to segment files and makes them
/// durable before the writer commits pointers to them.
pub struct SegmentAppender {
    segments: Arc<Segments>,
    active: HashMap<(u32, u32), Active>,
    /// Files written to since the last sync.
    dirty: HashMap<SegmentId, Arc<File>>,
    /// Directories that gained files since the last sync.
    dirty_dirs: HashSet<PathBuf>,
    /// Segments started since [`Self::take_created`].
    created: Vec<SegmentId>,
    /// Bytes written to files since [`Self::take_written`].
    written: u64,
}

impl SegmentAppender {
    pub fn new(segments: Arc<Segments>) -> SegmentAppender {
        SegmentAppender {
            segments,
            active: HashMap::new(),
            dirty: HashMap::new(),
            dirty_dirs: HashSet::new(),
            created: Vec::new(),
            written: 0,
        }
    }

    pub fn segments(&self) -> &Arc<Segments> {
        &self.segments
    }

    /// Append a batch based at `base` to its partition's segment, starting a
    /// new segment when `roll` says so. Returns where the batch will be once
    /// [`Self::write`] has run.
    pub fn append(
        &mut self,
        topic: u32,
        partition: u32,
        base: u64,
        bytes: &[u8],
        has_keys: bool,
        roll: impl FnOnce() -> Roll,
    ) -> Result<Pointer, StorageError> {
        let key = (topic, partition);
        // After a start or a failed commit a partition starts a new segment
        // rather than finding where its last one ended.
        let due = self.active.get(&key).is_none_or(|a| {
            a.length > 0 && (a.length >= a.roll.bytes_max || a.opened.elapsed() >= a.roll.age_max)
        });
        if due {
            if let Some(mut old) = self.active.remove(&key) {
                let id = SegmentId {
                    topic,
                    partition,
                    base: old.base,
                };
                self.written += write_out(&self.segments, &mut self.dirty, id, &mut old)?;
            }
            let active = self.create(topic, partition, base, roll())?;
            self.active.insert(key, active);
        }
        let active = self.active.get_mut(&key).expect("an active segment");
        let id = SegmentId {
            topic,
            partition,
            base: active.base,
        };
        let pointer = Pointer {
            segment: active.base,
            position: active.length,
            length: bytes.len() as u32,
            checksum: batch::checksum(bytes),
            has_keys,
        };
        active.pending.extend_from_slice(bytes);
        active.length += bytes.len() as u64;
        if active.pending.len() >= PENDING_BYTES_MAX {
            self.written += write_out(&self.segments, &mut self.dirty, id, active)?;
        }
        Ok(pointer)
    }

    /// The segments started since the last call, for the writer to record
    /// in the `segments` table.
    pub fn take_created(&mut self) -> Vec<SegmentId> {
        std::mem::take(&mut self.created)
    }

    /// Write every appended batch to its file.
    pub fn write(&mut self) -> Result<(), StorageError> {
        for (&(topic, partition), active) in self.active.iter_mut() {
            let id = SegmentId {
                topic,
                partition,
                base: active.base,
            };
            self.written += write_out(&self.segments, &mut self.dirty, id, active)?;
        }
        Ok(())
    }

    /// Bytes written to files since the last call.
    pub fn take_written(&mut self) -> u64 {
        std::mem::take(&mut self.written)
    }

    fn create(
        &mut self,
        topic: u32,
        partition: u32,
        base: u64,
        roll: Roll,
    ) -> Result<Active, StorageError> {
        let id = SegmentId {
            topic,
            partition,
            base,
        };
        let path = self.segments.path(id);
        let dir = self.segments.partition_dir(topic, partition);
        if !dir.exists() {
            std::fs::create_dir_all(&dir).map_err(|e| io_error("creating", &dir, e))?;
            self.dirty_dirs.insert(self.segments.dir.clone());
            self.dirty_dirs
                .insert(self.segments.dir.join(topic.to_string()));
        }
        self.dirty_dirs.insert(dir);
        // A segment starts at its partition's end, so a file already at
        // this base holds nothing committed (a failed commit's bytes).
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| io_error("creating", &path, e))?;
        tracing::debug!(file = %path.display(), "new segment");
        self.created.push(id);
        Ok(Active {
            base,
            file: Arc::new(file),
            length: 0,
            pending: Vec::new(),
            opened: Instant::now(),
            roll,
        })
    }

    /// Make every write since the last sync durable; returns the files
    /// synced.
    pub fn sync(&mut self) -> Result<usize, StorageError> {
        let files: Vec<(&SegmentId, &Arc<File>)> = self.dirty.iter().collect();
        let synced = files.len();
        let sync_one = |(id, file): &(&SegmentId, &Arc<File>)| {
            let path = self.segments.path(**id);
            self.segments.injected(FAULT_SYNC, &path)?;
            file.sync_data().map_err(|e| io_error("syncing", &path, e))
        };
        if files.len() == 1 {
            sync_one(&files[0])?;
        } else {
            // Different files: let the disk see a few flushes together.
            for chunk in files.chunks(SYNC_THREADS_MAX) {
                std::thread::scope(|s| {
                    let handles: Vec<_> = chunk.iter().map(|f| s.spawn(|| sync_one(f))).collect();
                    handles
                        .into_iter()
                        .map(|h| {
                            h.join().unwrap_or_else(|_| {
                                Err(StorageError::Redb("a segment fsync thread panicked".into()))
                            })
                        })
                        .collect::<Result<Vec<()>, StorageError>>()
                })?;
            }
        }
        let dirs: Vec<PathBuf> = self.dirty_dirs.iter().cloned().collect();
        for dir in dirs {
            match File::open(&dir).and_then(|d| d.sync_all()) {
                Ok(()) => {}
                // A deleted topic's directory: nothing left to make durable.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error("syncing", &dir, e)),
            }
            self.dirty_dirs.remove(&dir);
        }
        self.dirty.clear();
        Ok(synced)
    }

    /// Stop appending to segments that `doomed` says are being deleted:
    /// their partitions start new segments, and their lengths are not
    /// recorded.
    pub fn drop_doomed(&mut self, doomed: impl Fn(&SegmentId) -> bool) {
        self.active.retain(|&(topic, partition), active| {
            !doomed(&SegmentId {
                topic,
                partition,
                base: active.base,
            })
        });
        self.created.retain(|id| !doomed(id));
    }

    /// A commit failed: start every partition on a new segment, so nothing
    /// is appended behind bytes of unknown state. Files written since the
    /// last sync stay on the list to sync: earlier commits that were not
    /// synced (`durability = none`) still point into them.
    pub fn abandon_all(&mut self) {
        self.active.clear();
        self.created.clear();
    }
}

/// Write a segment's pending bytes to its file; returns how many.
fn write_out(
    segments: &Segments,
    dirty: &mut HashMap<SegmentId, Arc<File>>,
    id: SegmentId,
    active: &mut Active,
) -> Result<u64, StorageError> {
    if active.pending.is_empty() {
        return Ok(0);
    }
    let written = active.pending.len() as u64;
    let path = segments.path(id);
    segments.injected(FAULT_WRITE, &path)?;
    let at = active.length - active.pending.len() as u64;
    active
        .file
        .write_all_at(&active.pending, at)
        .map_err(|e| io_error("writing", &path, e))?;
    active.pending.clear();
    dirty.insert(id, active.file.clone());
    Ok(written)
}

type SegmentTable<'t> = redb::Table<'t, (u32, u32, u64), u64>;

/// The writer's side: drops segments from the `segments` table as
/// retention and topic deletes empty them, and deletes their files once
/// that commit succeeded.
pub struct SegmentReaper {
    segments: Arc<Segments>,
    doomed: Vec<SegmentId>,
    doomed_topics: Vec<u32>,
}

impl SegmentReaper {
    pub fn new(segments: Arc<Segments>) -> SegmentReaper {
        SegmentReaper {
            segments,
            doomed: Vec::new(),
            doomed_topics: Vec::new(),
        }
    }

    pub fn segments(&self) -> &Arc<Segments> {
        &self.segments
    }

    /// Drop the segments of a partition that hold only batches below
    /// `start` (all of them when `start` is the partition's `end`).
    pub fn trim(
        &mut self,
        table: &mut SegmentTable,
        topic: u32,
        partition: u32,
        start: u64,
        end: u64,
    ) -> Result<(), StorageError> {
        let bases: Vec<u64> = table
            .range((topic, partition, 0)..=(topic, partition, u64::MAX))?
            .map(|e| e.map(|(k, _)| k.value().2))
            .collect::<Result<_, _>>()?;
        for (i, &base) in bases.iter().enumerate() {
            let next = bases.get(i + 1).copied().unwrap_or(end);
            if next > start && start < end {
                break;
            }
            table.remove((topic, partition, base))?;
            self.doom(SegmentId {
                topic,
                partition,
                base,
            });
        }
        Ok(())
    }

    /// Delete this segment's file once the commit succeeded.
    pub fn doom(&mut self, id: SegmentId) {
        self.doomed.push(id);
    }

    /// Whether the coming commit deletes this segment's file.
    pub fn dooms(&self, id: &SegmentId) -> bool {
        self.doomed_topics.contains(&id.topic) || self.doomed.contains(id)
    }

    /// Whether the coming commit deletes files (it must then be durable).
    pub fn deletes_files(&self) -> bool {
        !self.doomed.is_empty() || !self.doomed_topics.is_empty()
    }

    /// Drop every segment of a deleted topic.
    pub fn drop_topic(&mut self, table: &mut SegmentTable, topic: u32) -> Result<(), StorageError> {
        table.retain_in((topic, 0, 0)..=(topic, u32::MAX, u64::MAX), |_, _| false)?;
        self.doomed_topics.push(topic);
        Ok(())
    }

    /// The commit succeeded: delete the files it dropped.
    pub fn committed(&mut self) {
        for id in std::mem::take(&mut self.doomed) {
            let path = self.segments.path(id);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "deleting a trimmed segment failed; start-up retries")
                }
            }
            self.segments.forget(|cached| *cached != id);
        }
        for topic in std::mem::take(&mut self.doomed_topics) {
            let dir = self.segments.dir.join(topic.to_string());
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(dir = %dir.display(), error = %e, "deleting a topic's segments failed; start-up retries");
                }
            }
            self.segments.forget(|cached| cached.topic != topic);
        }
    }

    /// The commit failed: its drops did not happen.
    pub fn failed(&mut self) {
        self.doomed.clear();
        self.doomed_topics.clear();
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
        /// Store `batches` (base offset, bytes) as the writer does: append,
        /// write, sync, then commit the lengths.
        fn commit(&mut self, roll: Roll, batches: &[(u64, Vec<u8>)]) -> Vec<Pointer> {
            let mut pointers = Vec::new();
            for (base, bytes) in batches {
                let at = self
                    .writer
                    .append(1, 0, *base, bytes, false, || roll)
                    .expect("append");
                pointers.push(at);
            }
            self.writer.write().expect("write");
            self.writer.sync().expect("sync");
            let txn = self.db.begin_write().expect("txn");
            {
                let mut table = txn.open_table(tables::SEGMENTS).expect("table");
                for id in self.writer.take_created() {
                    table.insert((id.topic, id.partition, id.base), 0).unwrap();
                }
                let mut log = txn.open_table(tables::LOG).expect("table");
                let header = batch::encode(0, &[]);
                for ((base, _), at) in batches.iter().zip(&pointers) {
                    let row = batch::encode_pointer(&header, *at);
                    log.insert((1, 0, *base), row.as_slice()).unwrap();
                }
            }
            txn.commit().expect("commit");
            pointers
        }
    }

    #[test]
    fn a_segment_rolls_at_its_byte_limit_not_before() {
        let mut f = fixture();
        let roll = Roll {
            bytes_max: 100,
            age_max: Duration::from_secs(3600),
        };
        // 99 bytes: one under the limit, the next batch joins the segment.
        let at = f.commit(roll, &[(0, vec![1; 99]), (1, vec![2; 10])]);
        assert_eq!((at[0].segment, at[1].segment, at[1].position), (0, 0, 99));
        // 109 bytes: at or past the limit, the next batch starts segment 2.
        let at = f.commit(roll, &[(2, vec![3; 10])]);
        assert_eq!((at[0].segment, at[0].position), (2, 0));
        // Exactly at the limit also rolls.
        let mut g = fixture();
        let at = g.commit(roll, &[(0, vec![1; 100]), (1, vec![2; 1])]);
        assert_eq!((at[0].segment, at[1].segment), (0, 1));
        let read = g.writer.segments().read(1, 0, &at[1]).expect("read");
        assert_eq!(read, Some(vec![2; 1]));
    }

    #[test]
    fn appends_are_written_out_once_a_segment_gathers_a_mebibyte() {
        let mut f = fixture();
        let path = f.writer.segments().path(SegmentId {
            topic: 1,
            partition: 0,
            base: 0,
        });
        let len = || std::fs::metadata(&path).unwrap().len() as usize;
        f.writer
            .append(1, 0, 0, &vec![1; PENDING_BYTES_MAX - 1], false, || {
                BROKER_MAX
            })
            .unwrap();
        assert_eq!(len(), 0, "one byte under the limit: still gathered");
        f.writer
            .append(1, 0, 1, &[2], false, || BROKER_MAX)
            .unwrap();
        assert_eq!(len(), PENDING_BYTES_MAX, "at the limit: written out");
        f.writer
            .append(1, 0, 2, &[3], false, || BROKER_MAX)
            .unwrap();
        assert_eq!(len(), PENDING_BYTES_MAX);
        f.writer.write().unwrap();
        assert_eq!(len(), PENDING_BYTES_MAX + 1);
    }

    #[test]
    fn start_up_cuts_uncommitted_bytes_and_deletes_unnamed_files() {
        let mut f = fixture();
        let at = f.commit(BROKER_MAX, &[(0, vec![5; 64])]);
        let segments = f.writer.segments().clone();
        assert_eq!(
            segments.read(1, 0, &at[0]).expect("read"),
            Some(vec![5; 64])
        );
        // A commit that never finished left bytes behind, and a file no row names.
        let path = segments.path(SegmentId {
            topic: 1,
            partition: 0,
            base: 0,
        });
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        file.write_all_at(&[9; 30], 64).unwrap();
        let orphan = segments.path(SegmentId {
            topic: 1,
            partition: 0,
            base: 7,
        });
        std::fs::write(&orphan, b"never committed").unwrap();
        let recovered = Segments::recover(f.dir.path(), &f.db, None).expect("recover");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 64);
        assert!(!orphan.exists());
        assert_eq!(recovered.read(1, 0, &at[0]).unwrap(), Some(vec![5; 64]));
        // A checksum that does not match is corruption, not data.
        let mut wrong = at[0];
        wrong.checksum ^= 1;
        assert!(matches!(
            recovered.read(1, 0, &wrong),
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
    fn trimmed_segments_go_after_the_commit_and_a_failed_commit_starts_a_new_one() {
        let mut f = fixture();
        let roll = Roll {
            bytes_max: 10,
            age_max: Duration::from_secs(3600),
        };
        let at = f.commit(
            roll,
            &[(0, vec![1; 10]), (5, vec![2; 10]), (9, vec![3; 10])],
        );
        assert_eq!(at.iter().map(|p| p.segment).collect::<Vec<_>>(), [0, 5, 9]);
        let segments = f.writer.segments().clone();
        let id = |base| SegmentId {
            topic: 1,
            partition: 0,
            base,
        };
        // Start 6: segment 0 (offsets 0..5) is wholly trimmed, 5 is not.
        let txn = f.db.begin_write().unwrap();
        {
            let mut table = txn.open_table(tables::SEGMENTS).unwrap();
            f.reaper.trim(&mut table, 1, 0, 6, 12).unwrap();
        }
        assert!(segments.path(id(0)).exists(), "not before the commit");
        txn.commit().unwrap();
        f.reaper.committed();
        assert!(!segments.path(id(0)).exists());
        assert!(segments.path(id(5)).exists());
        assert_eq!(segments.read(1, 0, &at[0]).unwrap(), None);
        // A commit that fails leaves its bytes in no segment anyone reads.
        let big = Roll {
            bytes_max: 1000,
            ..roll
        };
        f.writer.append(1, 0, 12, &[4; 3], false, || big).unwrap();
        f.writer.write().unwrap();
        f.writer.abandon_all();
        let at = f.commit(roll, &[(12, vec![5; 3])]);
        assert_eq!((at[0].segment, at[0].position), (12, 0));
        Segments::recover(f.dir.path(), &f.db, None).expect("recover");
        assert_eq!(std::fs::metadata(segments.path(id(12))).unwrap().len(), 3);
    }
}
