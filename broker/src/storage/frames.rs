//! The command log's frames: what one group commit appends to the segment
//! files, and how start-up finds the frames to apply again.
//!
//! A frame is a header ([`FRAME_HEADER_BYTES`]) followed by its body: the
//! values the commit appended to logs (batches, in the order the commit
//! appended them, so log rows point straight into the frame) and then its
//! meta: the commands as submitted, with the batches of `Append` commands
//! left out (they are among the values), and for each value the `Append`
//! it came from, if any. The frame is the commit point: once its bytes are
//! synced the commit is durable, and redb, the applied state and index, is
//! committed without its own fsync and made durable at checkpoints.
//!
//! Header layout, little-endian: magic `u32`, body length `u32`, applied
//! index `u64`, meta length `u32`, zero `u32`, checksum `u64` (xxh3 of the
//! first 24 header bytes and the xxh3 of the body).
//!
//! Invariants: a frame never spans two files; frames in a file follow each
//! other without gaps; applied indexes rise by one from frame to frame,
//! except where a commit failed: the writer then starts a new file, and the
//! first frame of that file supersedes the frames of the same or a higher
//! index before it (the failed commit's).

use super::StorageError;
use crate::command::Command;
use std::fs::File;
use std::os::unix::fs::FileExt;
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

/// Bytes of a frame's header.
pub const FRAME_HEADER_BYTES: u64 = 32;
const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"MSQF");
/// A frame's body is at most this big (commits are bounded by
/// `commit_bytes_max`, at most 1 GiB, plus what they generate).
pub const FRAME_BODY_BYTES_MAX: u64 = 2 << 30;

/// Which `Append` command (index in the commit) and which of its batches a
/// value came from; `None` for values the commit generated (releases, dead
/// letters, plugin output) or carried inside other commands.
pub type Origin = Option<(u32, u32)>;

/// A frame's header, as read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub body_bytes: u64,
    pub applied_index: u64,
    pub meta_bytes: u64,
    pub checksum: u64,
}

impl FrameHeader {
    pub fn encode(&self) -> [u8; FRAME_HEADER_BYTES as usize] {
        let mut out = [0u8; FRAME_HEADER_BYTES as usize];
        out[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
        out[4..8].copy_from_slice(&(self.body_bytes as u32).to_le_bytes());
        out[8..16].copy_from_slice(&self.applied_index.to_le_bytes());
        out[16..20].copy_from_slice(&(self.meta_bytes as u32).to_le_bytes());
        out[24..32].copy_from_slice(&self.checksum.to_le_bytes());
        out
    }

    /// The checksum of a header's first 24 bytes and its body's digest.
    fn seal(fields: &[u8], body_digest: u64) -> u64 {
        let mut hasher = Xxh3::new();
        hasher.update(&fields[..24]);
        hasher.update(&body_digest.to_le_bytes());
        hasher.digest()
    }

    /// Build the header of a body whose xxh3 is `body_digest`.
    pub fn sealed(body_bytes: u64, applied_index: u64, meta_bytes: u64, body_digest: u64) -> Self {
        let mut header = FrameHeader {
            body_bytes,
            applied_index,
            meta_bytes,
            checksum: 0,
        };
        header.checksum = Self::seal(&header.encode(), body_digest);
        header
    }

    /// Parse a header; `None` when it is not one (a torn or zeroed tail).
    fn parse(bytes: &[u8; FRAME_HEADER_BYTES as usize]) -> Option<FrameHeader> {
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
        if u32_at(0) != FRAME_MAGIC || u32_at(20) != 0 {
            return None;
        }
        let header = FrameHeader {
            body_bytes: u32_at(4) as u64,
            applied_index: u64_at(8),
            meta_bytes: u32_at(16) as u64,
            checksum: u64_at(24),
        };
        (header.meta_bytes <= header.body_bytes).then_some(header)
    }

    /// Whether `body` is the body this header was sealed over.
    fn matches(&self, body: &[u8]) -> bool {
        Self::seal(&self.encode(), xxh3_64(body)) == self.checksum
    }
}

/// The meta section: commands as submitted (batches of `Append` commands
/// left out) and each value's origin and length.
pub fn encode_meta(commands: &[u8], values: &[(Origin, u32)]) -> Vec<u8> {
    postcard::to_allocvec(&(values, commands)).expect("encoding to a Vec cannot fail")
}

/// Leave the batches of `Append` commands out of `commands` while encoding
/// them (they are the frame's values), then put them back.
pub fn encode_stripped(commands: &mut [&mut Command]) -> Vec<u8> {
    let mut taken: Vec<Vec<u8>> = Vec::new();
    for command in commands.iter_mut() {
        if let Command::Append { appends, .. } = &mut **command {
            for append in appends.iter_mut() {
                taken.push(std::mem::take(&mut append.value));
            }
        }
    }
    let refs: Vec<&Command> = commands.iter().map(|c| &**c).collect();
    let encoded = crate::command::encode_refs(&refs);
    let mut taken = taken.into_iter();
    for command in commands.iter_mut() {
        if let Command::Append { appends, .. } = &mut **command {
            for append in appends.iter_mut() {
                append.value = taken.next().expect("as many as were taken");
            }
        }
    }
    encoded
}

/// A frame found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameAt {
    pub file: u64,
    /// Position of the header.
    pub start: u64,
    pub header: FrameHeader,
}

impl FrameAt {
    pub fn end(&self) -> u64 {
        self.start + FRAME_HEADER_BYTES + self.header.body_bytes
    }
}

/// A frame read back for applying again.
pub struct ReadFrame {
    pub commands: Vec<Command>,
    /// (position in the file, length) of each value, in append order.
    pub values: Vec<(u64, u32)>,
}

fn corrupt(what: String) -> StorageError {
    StorageError::Corrupt(what)
}

/// Read the frame at `at` and put each `Append` batch back into its command.
pub fn read(file: &File, at: &FrameAt) -> Result<ReadFrame, StorageError> {
    let mut body = vec![0u8; at.header.body_bytes as usize];
    file.read_exact_at(&mut body, at.start + FRAME_HEADER_BYTES)
        .map_err(|e| corrupt(format!("reading frame {}: {e}", at.header.applied_index)))?;
    if !at.header.matches(&body) {
        return Err(corrupt(format!(
            "frame {} changed after it was checked",
            at.header.applied_index
        )));
    }
    let values_end = (at.header.body_bytes - at.header.meta_bytes) as usize;
    let (origins, encoded): (Vec<(Origin, u32)>, Vec<u8>) =
        postcard::from_bytes(&body[values_end..])
            .map_err(|e| corrupt(format!("frame {} meta: {e}", at.header.applied_index)))?;
    let mut commands = crate::command::decode(&encoded)
        .map_err(|e| corrupt(format!("frame {} commands: {e}", at.header.applied_index)))?;
    let mut values = Vec::with_capacity(origins.len());
    let mut offset = 0usize;
    for (origin, length) in &origins {
        let length = *length as usize;
        let Some(value) = body[..values_end].get(offset..offset + length) else {
            return Err(corrupt(format!(
                "frame {} names more value bytes than it has",
                at.header.applied_index
            )));
        };
        if let Some((command, part)) = origin {
            let slot = match commands.get_mut(*command as usize) {
                Some(Command::Append { appends, .. }) => appends.get_mut(*part as usize),
                _ => None,
            };
            let Some(append) = slot else {
                return Err(corrupt(format!(
                    "frame {} names a batch its commands do not have",
                    at.header.applied_index
                )));
            };
            append.value = value.to_vec();
        }
        values.push((at.start + FRAME_HEADER_BYTES + offset as u64, length as u32));
        offset += length;
    }
    if offset != values_end {
        return Err(corrupt(format!(
            "frame {} has {} value bytes no origin accounts for",
            at.header.applied_index,
            values_end - offset
        )));
    }
    Ok(ReadFrame { commands, values })
}

/// The whole frames in `file` from `from` up to `limit`, in order; stops at
/// the first bytes that are not a whole, intact frame (a torn tail).
pub fn scan(file: &File, file_number: u64, from: u64, limit: u64) -> Vec<FrameAt> {
    let mut frames = Vec::new();
    let mut at = from;
    let mut header = [0u8; FRAME_HEADER_BYTES as usize];
    while at + FRAME_HEADER_BYTES <= limit {
        if file.read_exact_at(&mut header, at).is_err() {
            break;
        }
        let Some(parsed) = FrameHeader::parse(&header) else {
            break;
        };
        let end = at + FRAME_HEADER_BYTES + parsed.body_bytes;
        if parsed.body_bytes > FRAME_BODY_BYTES_MAX || end > limit {
            break;
        }
        let mut body = vec![0u8; parsed.body_bytes as usize];
        if file
            .read_exact_at(&mut body, at + FRAME_HEADER_BYTES)
            .is_err()
            || !parsed.matches(&body)
        {
            break;
        }
        frames.push(FrameAt {
            file: file_number,
            start: at,
            header: parsed,
        });
        at = end;
    }
    frames
}

/// Chain the frames found in consecutive files into the commits to apply
/// again after `applied_index`: each frame must carry the next index, except
/// the first frame of a file, which may carry a lower one and then
/// supersedes what came before it from that index on (a failed commit's
/// frame, retried in a new file). Stops at the first gap.
pub fn chain(files: Vec<Vec<FrameAt>>, applied_index: u64) -> Vec<FrameAt> {
    let mut chained: Vec<FrameAt> = Vec::new();
    'files: for frames in files {
        for (i, frame) in frames.into_iter().enumerate() {
            let index = frame.header.applied_index;
            let expected = chained
                .last()
                .map_or(applied_index + 1, |f| f.header.applied_index + 1);
            if index == expected {
                chained.push(frame);
            } else if i == 0 && index > applied_index && index < expected {
                chained.retain(|f| f.header.applied_index < index);
                chained.push(frame);
            } else if index <= applied_index {
                // Applied before the checkpoint.
                continue;
            } else {
                break 'files;
            }
        }
    }
    chained
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(file: u64, start: u64, index: u64) -> FrameAt {
        FrameAt {
            file,
            start,
            header: FrameHeader::sealed(10, index, 2, 0),
        }
    }

    #[test]
    fn a_header_reads_back_and_refuses_a_changed_body() {
        let body = b"values and meta".to_vec();
        let header = FrameHeader::sealed(body.len() as u64, 7, 4, xxh3_64(&body));
        let parsed = FrameHeader::parse(&header.encode()).expect("a header");
        assert_eq!(parsed, header);
        assert!(parsed.matches(&body));
        let mut changed = body.clone();
        changed[0] ^= 1;
        assert!(!parsed.matches(&changed));
        assert!(
            FrameHeader::parse(&[0u8; 32]).is_none(),
            "zeros are no frame"
        );
    }

    #[test]
    fn chaining_follows_indexes_and_lets_a_new_file_supersede_a_failed_frame() {
        // File 1: frames 5, 6, then 7 (a commit that failed); file 2 starts
        // with the retried 7, then 8.
        let files = vec![
            vec![frame(1, 0, 5), frame(1, 42, 6), frame(1, 84, 7)],
            vec![frame(2, 0, 7), frame(2, 42, 8)],
        ];
        let chained = chain(files, 4);
        let got: Vec<(u64, u64)> = chained
            .iter()
            .map(|f| (f.file, f.header.applied_index))
            .collect();
        assert_eq!(got, vec![(1, 5), (1, 6), (2, 7), (2, 8)]);
    }

    #[test]
    fn chaining_stops_at_a_gap_and_skips_frames_already_applied() {
        let files = vec![
            vec![frame(1, 0, 3), frame(1, 42, 4)],
            vec![frame(2, 0, 5)],
            vec![frame(3, 0, 9)],
        ];
        let chained = chain(files, 3);
        let got: Vec<u64> = chained.iter().map(|f| f.header.applied_index).collect();
        assert_eq!(got, vec![4, 5], "frame 3 was applied; 9 leaves a gap");
    }
}
