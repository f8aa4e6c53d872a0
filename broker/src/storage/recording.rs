//! A file of the commands a store applied, in commit order, for replay.
//!
//! Owns: the recording format and its writer. Each committed write
//! transaction that applied commands is one frame: `length: u32` (LE, of
//! what follows the index), `index: u64` (LE, the store's applied index
//! after it, [`super::tables::META_APPLIED_INDEX`]), then the commands as
//! [`crate::command::encode`] writes them. Replaying the frames in order on
//! an empty store rebuilds the same observable state
//! ([`super::digest`]).
//!
//! Invariants: a frame is written before its transaction commits, and cut
//! off again if the commit fails; at open, frames past the store's applied
//! index (written, then the process died before the commit) and a torn last
//! frame are cut off. So after any crash the file holds exactly the
//! committed transactions. It survives the process being killed, not the
//! machine losing power (it is not fsynced: it is a tool for tests and
//! debugging, switched on with `record_commands`).

use super::StorageError;
use crate::command::{self, Command};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Bytes before a frame's commands: length and index.
const FRAME_HEADER_BYTES: usize = 4 + 8;
/// The largest frame read back (a group commit is bounded by
/// `commit_bytes_max`, at most 1 GiB).
pub const RECORDING_FRAME_BYTES_MAX: usize = 1 << 30;

fn io(what: &str, path: &Path, e: std::io::Error) -> StorageError {
    StorageError::Redb(format!("{what} {}: {e}", path.display()))
}

/// Appends frames as the writer commits.
pub struct Recorder {
    path: PathBuf,
    file: File,
    /// Length of the file up to the last committed frame.
    committed_bytes: u64,
}

impl Recorder {
    /// Open (or create) `path` for a store whose applied index is
    /// `applied_index`, cutting off frames the store never committed.
    pub fn open(path: &Path, applied_index: u64) -> Result<Recorder, StorageError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| io("opening", path, e))?;
        let frames = read_frames(&mut file, path)?;
        let keep = frames
            .iter()
            .take_while(|f| f.index <= applied_index)
            .last()
            .map_or(0, |f| f.end);
        file.set_len(keep).map_err(|e| io("cutting", path, e))?;
        file.seek(SeekFrom::Start(keep))
            .map_err(|e| io("seeking in", path, e))?;
        Ok(Recorder {
            path: path.to_path_buf(),
            file,
            committed_bytes: keep,
        })
    }

    /// Write the frame of the transaction about to commit.
    pub fn append(&mut self, index: u64, encoded: &[u8]) -> Result<(), StorageError> {
        let mut frame = Vec::with_capacity(FRAME_HEADER_BYTES + encoded.len());
        frame.extend_from_slice(&(encoded.len() as u32).to_le_bytes());
        frame.extend_from_slice(&index.to_le_bytes());
        frame.extend_from_slice(encoded);
        self.file
            .write_all(&frame)
            .map_err(|e| io("writing", &self.path, e))
    }

    /// The transaction committed: its frame stays.
    pub fn committed(&mut self) {
        match self.file.stream_position() {
            Ok(at) => self.committed_bytes = at,
            Err(e) => tracing::error!(path = %self.path.display(), error = %e,
                "command recording: position unknown"),
        }
    }

    /// The transaction failed: cut its frame off.
    pub fn failed(&mut self) {
        let cut = self
            .file
            .set_len(self.committed_bytes)
            .and_then(|()| self.file.seek(SeekFrom::Start(self.committed_bytes)));
        if let Err(e) = cut {
            tracing::error!(path = %self.path.display(), error = %e,
                "command recording: cutting off a failed commit's frame failed");
        }
    }
}

/// A frame's place in the file.
struct FrameAt {
    index: u64,
    start: u64,
    end: u64,
}

/// Every whole frame of the file; a torn or oversize last frame ends it.
fn read_frames(file: &mut File, path: &Path) -> Result<Vec<FrameAt>, StorageError> {
    let mut bytes = Vec::new();
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.read_to_end(&mut bytes))
        .map_err(|e| io("reading", path, e))?;
    let mut frames = Vec::new();
    let mut at = 0usize;
    while bytes.len() - at >= FRAME_HEADER_BYTES {
        let length = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        let index = u64::from_le_bytes(bytes[at + 4..at + 12].try_into().expect("8 bytes"));
        let end = at + FRAME_HEADER_BYTES + length;
        if length > RECORDING_FRAME_BYTES_MAX || end > bytes.len() {
            break;
        }
        frames.push(FrameAt {
            index,
            start: at as u64,
            end: end as u64,
        });
        at = end;
    }
    Ok(frames)
}

/// A recorded transaction: the applied index after it, and its commands.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedCommit {
    pub index: u64,
    pub commands: Vec<Command>,
}

/// Read a recording back. A torn last frame is left out; a frame that does
/// not decode is an error naming its place.
pub fn read(path: &Path) -> Result<Vec<RecordedCommit>, StorageError> {
    let mut file = File::open(path).map_err(|e| io("opening", path, e))?;
    let frames = read_frames(&mut file, path)?;
    let mut bytes = Vec::new();
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.read_to_end(&mut bytes))
        .map_err(|e| io("reading", path, e))?;
    frames
        .iter()
        .map(|f| {
            let body = &bytes[f.start as usize + FRAME_HEADER_BYTES..f.end as usize];
            let commands = command::decode(body).map_err(|e| {
                StorageError::Corrupt(format!(
                    "{}: the frame at byte {} (index {}): {e}",
                    path.display(),
                    f.start,
                    f.index
                ))
            })?;
            Ok(RecordedCommit {
                index: f.index,
                commands,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(name: &str) -> Command {
        Command::CreateTopic {
            name: name.into(),
            partitions: 1,
            created_at_ms: 7,
        }
    }

    #[test]
    fn frames_past_the_applied_index_and_torn_frames_are_cut_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("commands");
        let mut r = Recorder::open(&path, 0).unwrap();
        for (index, name) in [(1, "a"), (2, "b"), (3, "c")] {
            r.append(index, &command::encode(&[topic(name)])).unwrap();
            r.committed();
        }
        // A failed commit's frame goes at once.
        r.append(4, &command::encode(&[topic("d")])).unwrap();
        r.failed();
        drop(r);
        assert_eq!(read(&path).unwrap().len(), 3);
        // The store says only 2 commits happened: the third frame goes.
        let mut r = Recorder::open(&path, 2).unwrap();
        // A torn frame (killed mid-write) is cut off too.
        r.file.write_all(&[9, 0, 0]).unwrap();
        drop(r);
        Recorder::open(&path, 2).unwrap();
        // So is a frame claiming more than RECORDING_FRAME_BYTES_MAX.
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&((RECORDING_FRAME_BYTES_MAX + 1) as u32).to_le_bytes())
            .unwrap();
        file.write_all(&3u64.to_le_bytes()).unwrap();
        drop(file);
        let commits = read(&path).unwrap();
        assert_eq!(
            commits,
            vec![
                RecordedCommit {
                    index: 1,
                    commands: vec![topic("a")]
                },
                RecordedCommit {
                    index: 2,
                    commands: vec![topic("b")]
                },
            ]
        );
    }
}
