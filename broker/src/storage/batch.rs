//! The stored form of one produced batch.
//!
//! Batch layout (little-endian): `version: u8` (1, or 3 when some record
//! has a key, so retention knows without decoding), `count: u32`,
//! `timestamp_ms: u64`, `base_sequence: u64`, then `count` postcard-encoded
//! [`NewMessage`] records back to back. The batch's base offset is in the
//! key; record `i` has offset `base + i` and message id
//! `(store id, base_sequence + i)`. Every record shares the batch timestamp
//! (the broker's append time).
//!
//! The batch bytes live in a segment file ([`super::segments`]); the redb
//! log row holds a [`Pointer`]: the same header with `version = 2`, then
//! `segment: u64` (the segment file's number), `position: u64`,
//! `length: u32`, `checksum: u64` (xxh3 of the batch bytes) and
//! `flags: u8` (bit 0: some record has a key). Data directories written
//! before batches went straight to segments may still hold rows with the
//! batch itself; reads and trims take both.

use msmq_protocol::{Message, MessageId, NewMessage};

const BATCH_FORMAT_VERSION: u8 = 1;
const POINTER_FORMAT_VERSION: u8 = 2;
const KEYED_BATCH_FORMAT_VERSION: u8 = 3;
const HEADER_BYTES: usize = 1 + 4 + 8 + 8;
const SEQUENCE_AT: usize = 13;
const POINTER_BYTES: usize = HEADER_BYTES + 8 + 8 + 4 + 8 + 1;
const FLAG_HAS_KEYS: u8 = 1;

/// Where a batch's bytes are in the broker's segment files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pointer {
    /// The segment file's number (its name).
    pub segment: u64,
    pub position: u64,
    pub length: u32,
    /// xxh3 of the batch bytes, checked on every read.
    pub checksum: u64,
    pub has_keys: bool,
}

/// The log row for a batch stored at `pointer`: the batch's header with the
/// pointer after it.
pub fn encode_pointer(batch: &[u8], pointer: Pointer) -> Vec<u8> {
    let mut out = Vec::with_capacity(POINTER_BYTES);
    out.extend_from_slice(&batch[..HEADER_BYTES]);
    out[0] = POINTER_FORMAT_VERSION;
    out.extend_from_slice(&pointer.segment.to_le_bytes());
    out.extend_from_slice(&pointer.position.to_le_bytes());
    out.extend_from_slice(&pointer.length.to_le_bytes());
    out.extend_from_slice(&pointer.checksum.to_le_bytes());
    out.push(if pointer.has_keys { FLAG_HAS_KEYS } else { 0 });
    out
}

/// Bytes of the batch a log row stands for: the pointer's length, or the
/// row's own for a row holding its batch.
pub fn stored_bytes(row: &[u8]) -> Result<u64, String> {
    Ok(match pointer(row)? {
        Some(at) => at.length as u64,
        None => row.len() as u64,
    })
}

/// Whether some record of a stored batch (not a pointer) has a key.
pub fn is_keyed(batch: &[u8]) -> bool {
    batch.first() == Some(&KEYED_BATCH_FORMAT_VERSION)
}

/// The pointer of a log row, or `None` when the row holds the batch itself.
pub fn pointer(value: &[u8]) -> Result<Option<Pointer>, String> {
    header(value)?;
    if value[0] != POINTER_FORMAT_VERSION {
        return Ok(None);
    }
    if value.len() != POINTER_BYTES {
        return Err(format!(
            "batch pointer of {} bytes, not {POINTER_BYTES}",
            value.len()
        ));
    }
    let u64_at = |at: usize| u64::from_le_bytes(value[at..at + 8].try_into().expect("8 bytes"));
    Ok(Some(Pointer {
        segment: u64_at(HEADER_BYTES),
        position: u64_at(HEADER_BYTES + 8),
        length: u32::from_le_bytes(
            value[HEADER_BYTES + 16..HEADER_BYTES + 20]
                .try_into()
                .expect("4 bytes"),
        ),
        checksum: u64_at(HEADER_BYTES + 20),
        has_keys: value[POINTER_BYTES - 1] & FLAG_HAS_KEYS != 0,
    }))
}

/// The checksum a [`Pointer`] carries.
pub fn checksum(batch: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(batch)
}

/// Encode records as one stored batch value. The writer fills in the base
/// sequence ([`set_base_sequence`]) when it assigns ids.
pub fn encode(timestamp_ms: u64, records: &[&NewMessage]) -> Vec<u8> {
    let payload_bytes: usize = records.iter().map(|r| r.size_bytes() + 16).sum();
    let mut out = Vec::with_capacity(HEADER_BYTES + payload_bytes);
    let keyed = records.iter().any(|r| r.key.is_some());
    out.push(if keyed {
        KEYED_BATCH_FORMAT_VERSION
    } else {
        BATCH_FORMAT_VERSION
    });
    out.extend_from_slice(&(records.len() as u32).to_le_bytes());
    out.extend_from_slice(&timestamp_ms.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes());
    for record in records {
        out = postcard::to_extend(record, out).expect("encoding into a Vec cannot fail");
    }
    out
}

/// Set the message-id sequence of the batch's first record.
pub fn set_base_sequence(value: &mut [u8], sequence: u64) {
    value[SEQUENCE_AT..SEQUENCE_AT + 8].copy_from_slice(&sequence.to_le_bytes());
}

/// The fixed header of a stored batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub count: u32,
    pub timestamp_ms: u64,
    pub base_sequence: u64,
}

pub fn header(value: &[u8]) -> Result<BatchHeader, String> {
    if value.len() < HEADER_BYTES {
        return Err(format!(
            "stored batch of {} bytes is too short",
            value.len()
        ));
    }
    if ![
        BATCH_FORMAT_VERSION,
        POINTER_FORMAT_VERSION,
        KEYED_BATCH_FORMAT_VERSION,
    ]
    .contains(&value[0])
    {
        return Err(format!("unknown stored batch format {}", value[0]));
    }
    Ok(BatchHeader {
        count: u32::from_le_bytes(value[1..5].try_into().expect("4 bytes")),
        timestamp_ms: u64::from_le_bytes(value[5..13].try_into().expect("8 bytes")),
        base_sequence: u64::from_le_bytes(
            value[SEQUENCE_AT..SEQUENCE_AT + 8]
                .try_into()
                .expect("8 bytes"),
        ),
    })
}

/// Decode the records at offsets `from..` of a batch based at `base`, calling
/// `take` for each until it returns false.
pub fn decode_from(
    value: &[u8],
    store_id: u64,
    base: u64,
    from: u64,
    mut take: impl FnMut(Message) -> bool,
) -> Result<(), String> {
    let head = header(value)?;
    if value[0] == POINTER_FORMAT_VERSION {
        return Err(format!("batch at offset {base} is a pointer, not records"));
    }
    let mut rest = &value[HEADER_BYTES..];
    for i in 0..head.count as u64 {
        let (record, tail) = postcard::take_from_bytes::<NewMessage>(rest)
            .map_err(|e| format!("corrupt record {i} in batch at offset {base}: {e}"))?;
        rest = tail;
        let offset = base + i;
        if offset < from {
            continue;
        }
        let message = Message {
            offset,
            id: MessageId::new(store_id, head.base_sequence + i),
            timestamp_ms: head.timestamp_ms,
            payload: record.payload,
            key: record.key,
            tag: record.tag,
            headers: record.headers,
        };
        if !take(message) {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_from_the_middle() {
        let records: Vec<NewMessage> = (0..5u8)
            .map(|i| NewMessage::new(vec![i; 3]).with_tag(format!("t{i}")))
            .collect();
        let refs: Vec<&NewMessage> = records.iter().collect();
        let mut value = encode(42, &refs);
        set_base_sequence(&mut value, 1000);
        assert_eq!(
            header(&value).unwrap(),
            BatchHeader {
                count: 5,
                timestamp_ms: 42,
                base_sequence: 1000
            }
        );
        let mut got = Vec::new();
        decode_from(&value, 7, 100, 102, |m| {
            got.push(m);
            got.len() < 2
        })
        .unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].offset, 102);
        assert_eq!(got[0].payload, vec![2; 3]);
        assert_eq!(got[1].id, MessageId::new(7, 1003));
        assert!(decode_from(&value[..30], 7, 100, 100, |_| true).is_err());
    }

    #[test]
    fn a_pointer_keeps_the_header_and_round_trips() {
        let record = NewMessage::new(vec![1; 10]);
        let keyed = NewMessage::new(vec![2; 10]).with_key("k");
        assert!(!is_keyed(&encode(1, &[&record])));
        assert!(is_keyed(&encode(1, &[&record, &keyed])));
        let mut value = encode(42, &[&record]);
        set_base_sequence(&mut value, 9);
        let at = Pointer {
            segment: 100,
            position: 4096,
            length: value.len() as u32,
            checksum: checksum(&value),
            has_keys: true,
        };
        let row = encode_pointer(&value, at);
        assert_eq!(header(&row).unwrap(), header(&value).unwrap());
        assert_eq!(pointer(&row).unwrap(), Some(at));
        assert_eq!(pointer(&value).unwrap(), None);
        assert!(pointer(&row[..row.len() - 1]).is_err());
        assert!(decode_from(&row, 7, 0, 0, |_| true).is_err());
    }
}
