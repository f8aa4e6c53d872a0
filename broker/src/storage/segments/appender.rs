//! The writer's side of the segment files: appends each group commit's
//! frame to the active file (rolling only between frames), writes it out
//! once per commit, syncs it before the commit's redb transaction, names
//! files started or closed for `log_files`, and in replay mode answers each
//! append with where a frame already on disk holds it.
//!
//! Invariants: see the parent module's; a failed commit cuts its frame off
//! and starts a new file, so nothing is appended behind a torn tail.

use super::prefill::{prefill_due, Prefiller, WriterLoad, PAGE_BYTES, PREFILL_AT_ROLL_DIVISOR};
use super::*;

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
    /// Made from a prefilled file of this length: zeros past `length`
    /// until trimmed.
    prefilled: Option<u64>,
    /// The next file was asked for (or found not due) while this one is
    /// active.
    prefill_decided: bool,
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
    pub(super) committed_length: u64,
    /// Bytes written to files since [`Self::take_written`].
    written: u64,
    /// The frame the coming commit is writing.
    frame: Option<OpenFrame>,
    /// Where the last frame started, for the torn-frame test fault.
    last_frame_start: Option<u64>,
    /// Applying frames of the log again: no bytes are written, each append
    /// is answered with where the frame holds its value.
    replay: Option<ReplayFrame>,
    /// While applying frames again: the file they are in and where the
    /// last one ended.
    replay_file: Option<(u64, u64)>,
    /// Makes the next file ahead of time; `None` when turned off.
    prefiller: Option<Prefiller>,
    /// The writer's recent load, which decides whether to prefill.
    load: WriterLoad,
}

/// A frame being appended: its header's position, a running digest of its
/// body and each value's origin and length.
struct OpenFrame {
    start: u64,
    hasher: xxhash_rust::xxh3::Xxh3,
    values: Vec<(frames::Origin, u32)>,
}

/// A frame of the log being applied again.
struct ReplayFrame {
    file: u64,
    end: u64,
    values: std::collections::VecDeque<(u64, u32)>,
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
            frame: None,
            last_frame_start: None,
            replay: None,
            replay_file: None,
            prefiller: None,
            load: WriterLoad::new(Instant::now()),
        }
    }

    /// Have the next file zero-filled ahead of time while the writer is
    /// latency-bound (`prefill`).
    pub fn with_prefill(mut self, on: bool) -> SegmentAppender {
        self.prefiller = if on {
            Prefiller::for_dir(&self.segments.dir)
        } else {
            None
        };
        self
    }

    /// Whether a prefilled file waits to be taken; `None` without a
    /// prefiller.
    #[cfg(test)]
    pub(super) fn prefill_ready(&self) -> Option<bool> {
        self.prefiller.as_ref().map(Prefiller::is_ready)
    }

    #[cfg(test)]
    pub(super) fn assume_load(&mut self, load: WriterLoad) {
        self.load = load;
    }

    /// The writer spent `elapsed` on a commit of `bytes`.
    pub fn note_commit(&mut self, elapsed: Duration, bytes: u64) {
        self.load.add(Instant::now(), elapsed, bytes);
    }

    pub fn segments(&self) -> &Arc<Segments> {
        &self.segments
    }

    /// The number of the file appends go to next (files below it, and only
    /// those, may ever be deleted).
    pub fn first_live_number(&self) -> u64 {
        if let Some((file, _)) = self.replay_file {
            return file;
        }
        self.active.as_ref().map_or(self.next_number, |a| a.number)
    }

    /// Start the coming commit's frame: in a new file when `roll` (the
    /// first appending topic's) says the active one is old or big enough,
    /// or when there is none.
    fn begin_frame(&mut self, roll: Option<&dyn Fn() -> Roll>) -> Result<(), StorageError> {
        let due = self.active.as_ref().is_none_or(|a| {
            a.length > 0
                && roll.is_some_and(|roll| {
                    let roll = roll();
                    a.length >= roll.bytes_max || a.opened.elapsed() >= roll.age_max
                })
        });
        if due {
            if let Some(mut old) = self.active.take() {
                self.written += write_out(&self.segments, &mut self.dirty, &mut old)?;
                self.rows.push((old.number, old.length));
                if old.prefilled.is_some() {
                    if let Some(prefiller) = self.prefiller.as_mut() {
                        prefiller.trim(old.file.clone(), old.length);
                    }
                }
            }
            self.active = Some(self.create()?);
        }
        let active = self.active.as_mut().expect("an active segment");
        if let (Some(prefiller), Some(roll), false) =
            (self.prefiller.as_mut(), roll, active.prefill_decided)
        {
            let roll_bytes = roll().bytes_max;
            let load = self.load.recent();
            if let (true, Some((busy_fraction, bytes_per_sec))) =
                (active.length >= roll_bytes / PREFILL_AT_ROLL_DIVISOR, load)
            {
                active.prefill_decided = true;
                let due = prefill_due(active.length, roll_bytes, busy_fraction);
                tracing::debug!(
                    file = active.number,
                    busy_fraction,
                    bytes_per_sec,
                    due,
                    "whether to prefill the next segment file"
                );
                if due {
                    prefiller.request(roll_bytes, bytes_per_sec);
                }
            }
        }
        self.frame = Some(OpenFrame {
            start: active.length,
            hasher: xxhash_rust::xxh3::Xxh3::new(),
            values: Vec::new(),
        });
        active
            .pending
            .extend_from_slice(&[0u8; frames::FRAME_HEADER_BYTES as usize]);
        active.length += frames::FRAME_HEADER_BYTES;
        Ok(())
    }

    /// Append a batch to the coming commit's frame. Returns where the batch
    /// will be once [`Self::write`] has run.
    pub fn append(
        &mut self,
        bytes: &[u8],
        has_keys: bool,
        origin: frames::Origin,
        roll: impl Fn() -> Roll,
    ) -> Result<Pointer, StorageError> {
        if let Some(replay) = &mut self.replay {
            let Some((position, length)) = replay.values.pop_front() else {
                return Err(StorageError::Corrupt(
                    "a frame applied again appends more batches than it holds".into(),
                ));
            };
            if length as usize != bytes.len() {
                return Err(StorageError::Corrupt(format!(
                    "a frame applied again appends {} bytes where it holds {length}",
                    bytes.len()
                )));
            }
            return Ok(Pointer {
                segment: replay.file,
                position,
                length,
                checksum: batch::checksum(bytes),
                has_keys,
            });
        }
        if self.frame.is_none() {
            self.begin_frame(Some(&roll))?;
        }
        let active = self.active.as_mut().expect("an active segment");
        let frame = self.frame.as_mut().expect("an open frame");
        let pointer = Pointer {
            segment: active.number,
            position: active.length,
            length: bytes.len() as u32,
            checksum: batch::checksum(bytes),
            has_keys,
        };
        active.pending.extend_from_slice(bytes);
        active.length += bytes.len() as u64;
        frame.hasher.update(bytes);
        frame.values.push((origin, bytes.len() as u32));
        if active.pending.len() >= PENDING_BYTES_MAX {
            self.written += write_out(&self.segments, &mut self.dirty, active)?;
        }
        Ok(pointer)
    }

    /// Close the coming commit's frame with its meta (`commands`, encoded
    /// as submitted without their batches) and header. Returns the file and
    /// the position where the frame ends.
    pub fn finish_frame(
        &mut self,
        applied_index: u64,
        commands: &[u8],
    ) -> Result<(u64, u64), StorageError> {
        if let Some(replay) = &self.replay {
            if !replay.values.is_empty() {
                return Err(StorageError::Corrupt(format!(
                    "a frame applied again holds {} batches its commands did not append",
                    replay.values.len()
                )));
            }
            return Ok((replay.file, replay.end));
        }
        if self.frame.is_none() {
            self.begin_frame(None)?;
        }
        let OpenFrame {
            start,
            mut hasher,
            values,
        } = self.frame.take().expect("an open frame");
        let meta = frames::encode_meta(commands, &values);
        let active = self.active.as_mut().expect("an active segment");
        active.pending.extend_from_slice(&meta);
        active.length += meta.len() as u64;
        hasher.update(&meta);
        let body = active.length - start - frames::FRAME_HEADER_BYTES;
        if body > frames::FRAME_BODY_BYTES_MAX {
            return Err(StorageError::Corrupt(format!(
                "a commit of {body} bytes is over the {} a frame holds; lower commit_bytes_max",
                frames::FRAME_BODY_BYTES_MAX
            )));
        }
        let header =
            frames::FrameHeader::sealed(body, applied_index, meta.len() as u64, hasher.digest())
                .encode();
        let pending_from = active.length - active.pending.len() as u64;
        if start >= pending_from {
            let at = (start - pending_from) as usize;
            active.pending[at..at + header.len()].copy_from_slice(&header);
        } else {
            // The frame outgrew the write buffer: its header goes on its own.
            let path = self.segments.path(active.number);
            self.segments.injected(FAULT_WRITE, &path)?;
            active
                .file
                .write_all_at(&header, start)
                .map_err(|e| io_error("writing", &path, e))?;
        }
        self.last_frame_start = Some(start);
        Ok((active.number, active.length))
    }

    /// Test fault: cut the active file in the middle of its last frame and
    /// sync it, as a crash while writing that frame leaves it.
    pub fn tear_last_frame(&mut self) -> Result<(), StorageError> {
        self.write()?;
        let (Some(active), Some(start)) = (&self.active, self.last_frame_start) else {
            return Ok(());
        };
        let middle = start + (active.length - start) / 2;
        let path = self.segments.path(active.number);
        active
            .file
            .set_len(middle)
            .and_then(|_| active.file.sync_data())
            .map_err(|e| io_error("cutting", &path, e))
    }

    /// Start applying frames again, from the end of the last frame the
    /// store holds (file, end; `None` when no row names that file).
    pub fn start_replay(&mut self, from: Option<(u64, u64)>) {
        self.active = None;
        self.replay_file = from;
    }

    /// The coming commit applies the frame `at` again, whose values are at
    /// `values`; a frame in a new file names the file (and closes the one
    /// before) as the commit that wrote it did.
    pub fn replay_frame(&mut self, file: u64, end: u64, values: Vec<(u64, u32)>) {
        match self.replay_file {
            Some((current, current_end)) if current != file => {
                self.rows.push((current, current_end));
                self.rows.push((file, OPEN));
            }
            None => self.rows.push((file, OPEN)),
            _ => {}
        }
        self.replay_file = Some((file, end));
        self.next_number = self.next_number.max(file + 1);
        self.replay = Some(ReplayFrame {
            file,
            end,
            values: values.into(),
        });
    }

    /// Every frame was applied again: the last file they were in is closed
    /// (by the next commit) and appends go to a new file.
    pub fn finish_replay(&mut self) {
        self.replay = None;
        if let Some((file, end)) = self.replay_file.take() {
            self.rows.push((file, end));
        }
        self.active = None;
        self.committed_length = 0;
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
        // Renamed over whatever is there: a number above every named file
        // holds nothing committed (a failed commit's bytes).
        let prefilled = self.prefiller.as_mut().and_then(|prefiller| {
            let bytes = prefiller.take()?;
            std::fs::rename(prefiller.path(), &path)
                .inspect_err(|e| {
                    tracing::warn!(error = %e, file = %path.display(), "renaming a prefilled segment file")
                })
                .ok()
                .map(|_| bytes)
        });
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(prefilled.is_none())
            .open(&path)
            .map_err(|e| io_error("creating", &path, e))?;
        tracing::debug!(file = %path.display(), ?prefilled, "new segment");
        self.dir_dirty = true;
        self.rows.push((number, OPEN));
        Ok(Active {
            number,
            file: Arc::new(file),
            length: 0,
            pending: Vec::new(),
            opened: Instant::now(),
            prefilled,
            prefill_decided: false,
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
        self.frame = None;
        self.replay = None;
        self.rows.clear();
        self.closed_by_failure.clear();
        if let Some(active) = &self.active {
            self.committed_length = active.length;
        }
    }

    /// A commit failed: start a new file, so nothing is appended behind
    /// bytes of unknown state; the next commit that succeeds (a checkpoint)
    /// records where the abandoned file's committed bytes end, and where
    /// files the failed commit closed end. Files written since the last sync
    /// stay on the list to sync: earlier commits that were not synced
    /// (`durability = none`) still point into them.
    ///
    /// `cut`: the failure came before redb was asked to commit, so the
    /// commit certainly did not happen: its frame is cut off (and files it
    /// started are deleted), best effort, so start-up cannot apply it. When
    /// redb's commit itself failed, it may have reached the disk anyway:
    /// the frame stays, and the row the next checkpoint writes (or a later
    /// file's first frame, see `frames::chain`) keeps it from being applied
    /// when the commit did not happen.
    pub fn abandon_all(&mut self, cut: bool) {
        self.frame = None;
        self.replay = None;
        let started: Vec<u64> = self
            .rows
            .iter()
            .filter(|(_, length)| *length == OPEN)
            .map(|(n, _)| *n)
            .collect();
        // Files the failed commit closed (a roll) end where it said.
        let closed = self.rows.iter().filter(|(_, length)| *length != OPEN);
        self.closed_by_failure.extend(closed.copied());
        self.rows.clear();
        if let Some(active) = self.active.take() {
            let path = self.segments.path(active.number);
            if started.contains(&active.number) {
                // Nothing of it is committed: deleted, or else named with
                // no committed bytes, so start-up applies none of it.
                let removed = cut
                    && std::fs::remove_file(&path)
                        .inspect_err(|e| {
                            tracing::warn!(error = %e, file = %path.display(), "deleting a failed commit's segment")
                        })
                        .is_ok();
                if !removed {
                    self.closed_by_failure.push((active.number, 0));
                }
            } else {
                if cut {
                    if let Err(e) = active
                        .file
                        .set_len(self.committed_length)
                        .and_then(|_| active.file.sync_data())
                    {
                        tracing::warn!(error = %e, file = %path.display(), "cutting a failed commit's frame off");
                    }
                }
                self.closed_by_failure
                    .push((active.number, self.committed_length));
            }
        }
        self.committed_length = 0;
    }

    /// Whether rows wait for a commit (files started or closed).
    pub fn has_rows(&self) -> bool {
        !self.rows.is_empty() || !self.closed_by_failure.is_empty()
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
    let at = active.length - active.pending.len() as u64;
    // In a prefilled file, zeros up to the end of the page: the page is
    // then written whole and never read back from disk for the next
    // write, and the file's bytes are the same.
    if let Some(prefilled) = active.prefilled {
        let padded = active.length.next_multiple_of(PAGE_BYTES);
        if padded <= prefilled {
            active.pending.resize((padded - at) as usize, 0);
        }
    }
    let written = active.pending.len() as u64;
    let path = segments.path(active.number);
    segments.injected(FAULT_WRITE, &path)?;
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

impl Drop for SegmentAppender {
    /// A clean stop leaves the active file as long as its frames, so the
    /// next start-up has no zeros to cut (a crash leaves them to it).
    fn drop(&mut self) {
        if let Some(active) = self.active.as_ref().filter(|a| a.prefilled.is_some()) {
            if self.frame.is_none() {
                let _ = active.file.set_len(self.committed_length);
            }
        }
    }
}
