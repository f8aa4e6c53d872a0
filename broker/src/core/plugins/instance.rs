//! One live plugin instance and the calls into it, in the shape of the world
//! its component targets: `handle-batch` takes a `batch` of `message`
//! records, `handle-packed` the same messages laid out field by field
//! (`packed-batch`), which interpreted guests lift in a few copies instead of
//! several objects per message.
//!
//! Owns: the instance's `Store` and its world's bindings.
//!
//! Invariants:
//! - Both shapes hand the plugin the same messages, in the same order, with
//!   the same fields; only the layout differs.

use super::engine::PluginPre;
use super::host::packed::PackedConsumer;
use super::host::{
    Batch, Consumer, FlatStrings, Header, HostState, Message, MessageId, Outcome, PackedBatch,
    PackedOutcomes,
};
use wasmtime::Store;

/// What one message of a call carries besides the stored message.
pub(super) struct CallMessage<'a> {
    pub message: &'a msmq_protocol::Message,
    pub partition: u32,
    pub attempt: u32,
}

enum Bindings {
    Records(Consumer),
    Packed(PackedConsumer),
}

/// A live instance of a plugin.
pub(super) struct Instance {
    pub store: Store<HostState>,
    bindings: Bindings,
}

impl Instance {
    /// Instantiate `pre` in `store` (its limits already set).
    pub fn new(pre: &PluginPre, mut store: Store<HostState>) -> wasmtime::Result<Instance> {
        let bindings = match pre {
            PluginPre::Records(pre) => Bindings::Records(pre.instantiate(&mut store)?),
            PluginPre::Packed(pre) => Bindings::Packed(pre.instantiate(&mut store)?),
        };
        Ok(Instance { store, bindings })
    }

    pub fn call_init(
        &mut self,
        config: &[(String, String)],
    ) -> wasmtime::Result<Result<(), String>> {
        match &self.bindings {
            Bindings::Records(b) => b.call_init(&mut self.store, config),
            Bindings::Packed(b) => b.call_init(&mut self.store, config),
        }
    }

    /// Hand the plugin `messages` of `topic`; one outcome per message.
    pub fn call_batch(
        &mut self,
        topic: &str,
        messages: &[CallMessage<'_>],
    ) -> wasmtime::Result<Vec<Outcome>> {
        match &self.bindings {
            Bindings::Records(b) => {
                let batch = Batch {
                    topic: topic.to_string(),
                    messages: messages.iter().map(record).collect(),
                };
                b.call_handle_batch(&mut self.store, &batch)
            }
            Bindings::Packed(b) => {
                let returned = b.call_handle_packed(&mut self.store, &packed(topic, messages))?;
                unpack_outcomes(returned).map_err(wasmtime::Error::msg)
            }
        }
    }
}

/// The outcomes a `packed-outcomes` stands for, or why it stands for none.
fn unpack_outcomes(packed: PackedOutcomes) -> Result<Vec<Outcome>, String> {
    let mut retry_ms = packed.retry_ms.into_iter();
    let mut reasons = packed.reasons.into_iter();
    let mut outcomes = Vec::with_capacity(packed.kinds.len());
    for (i, kind) in packed.kinds.iter().enumerate() {
        let outcome = match kind {
            0 => Outcome::Ack,
            1 => Outcome::Retry(retry_ms.next().ok_or_else(|| {
                format!("handle-packed returned a retry at {i} without its delay in retry-ms")
            })?),
            2 => Outcome::DeadLetter(reasons.next().ok_or_else(|| {
                format!("handle-packed returned a dead letter at {i} without its reason")
            })?),
            other => {
                return Err(format!(
                    "handle-packed returned outcome kind {other} at {i} (0 ack, 1 retry, 2 dead-letter)"
                ))
            }
        };
        outcomes.push(outcome);
    }
    if retry_ms.next().is_some() || reasons.next().is_some() {
        return Err(
            "handle-packed returned more retry delays or reasons than outcomes that use them"
                .into(),
        );
    }
    Ok(outcomes)
}

fn record(m: &CallMessage<'_>) -> Message {
    let stored = m.message;
    Message {
        id: MessageId {
            hi: stored.id.store_id(),
            lo: stored.id.sequence(),
        },
        partition: m.partition,
        offset: stored.offset,
        timestamp_ms: stored.timestamp_ms,
        attempt: m.attempt,
        key: stored.key.as_ref().map(|k| k.to_vec()),
        tag: stored.tag.clone(),
        headers: stored.headers.iter().map(header).collect(),
        payload: stored.payload.clone(),
    }
}

fn header(h: &msmq_protocol::Header) -> Header {
    Header {
        name: h.name.clone(),
        value: h.value.clone(),
    }
}

/// Bit of `packed-batch.present`: the message has a key.
const PRESENT_KEY: u8 = 1;
/// Bit of `packed-batch.present`: the message has a tag.
const PRESENT_TAG: u8 = 2;

/// Strings laid end to end, as `flat-strings`.
#[derive(Default)]
struct Packer {
    data: Vec<u8>,
    ends: Vec<u8>,
}

impl Packer {
    fn with_capacity(count: usize, bytes: usize) -> Packer {
        Packer {
            data: Vec::with_capacity(bytes),
            ends: Vec::with_capacity(4 * count),
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        self.data.extend_from_slice(bytes);
        // A batch is bounded far below 4 GiB (BATCH_READ_BYTES_MAX).
        self.ends
            .extend_from_slice(&(self.data.len() as u32).to_le_bytes());
    }

    fn finish(self) -> FlatStrings {
        FlatStrings {
            data: self.data,
            ends: self.ends,
        }
    }
}

fn packed(topic: &str, messages: &[CallMessage<'_>]) -> PackedBatch {
    let count = messages.len();
    let payload_bytes = messages.iter().map(|m| m.message.payload.len()).sum();
    let mut ids = Vec::with_capacity(16 * count);
    let mut partitions = Vec::with_capacity(4 * count);
    let mut offsets = Vec::with_capacity(8 * count);
    let mut timestamps_ms = Vec::with_capacity(8 * count);
    let mut attempts = Vec::with_capacity(4 * count);
    let mut payloads = Packer::with_capacity(count, payload_bytes);
    let mut keys = Packer::with_capacity(count, 0);
    let mut tags = Packer::with_capacity(count, 0);
    let mut present = Vec::with_capacity(count);
    let mut headers = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let stored = m.message;
        ids.extend_from_slice(&stored.id.0);
        partitions.extend_from_slice(&m.partition.to_le_bytes());
        offsets.extend_from_slice(&stored.offset.to_le_bytes());
        timestamps_ms.extend_from_slice(&stored.timestamp_ms.to_le_bytes());
        attempts.extend_from_slice(&m.attempt.to_le_bytes());
        payloads.push(&stored.payload);
        keys.push(stored.key.as_deref().map_or(&[][..], |k| &k[..]));
        tags.push(stored.tag.as_deref().map_or(&[][..], str::as_bytes));
        present.push(
            if stored.key.is_some() { PRESENT_KEY } else { 0 }
                | if stored.tag.is_some() { PRESENT_TAG } else { 0 },
        );
        headers.extend(stored.headers.iter().map(|h| (i as u32, header(h))));
    }
    PackedBatch {
        topic: topic.to_string(),
        count: count as u32,
        ids,
        partitions,
        offsets,
        timestamps_ms,
        attempts,
        payloads: payloads.finish(),
        keys: keys.finish(),
        tags: tags.finish(),
        present,
        headers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(
        seq: u64,
        payload: &str,
        key: Option<&str>,
        tag: Option<&str>,
    ) -> msmq_protocol::Message {
        msmq_protocol::Message {
            offset: seq + 100,
            id: msmq_protocol::MessageId::new(0x0102_0304_0506_0708, seq),
            timestamp_ms: 1_700_000_000_000 + seq,
            payload: payload.as_bytes().to_vec(),
            key: key.map(|k| k.as_bytes().to_vec().into()),
            tag: tag.map(str::to_string),
            headers: if seq == 2 {
                vec![
                    msmq_protocol::Header {
                        name: "a".into(),
                        value: "1".into(),
                    },
                    msmq_protocol::Header {
                        name: "b".into(),
                        value: "2".into(),
                    },
                ]
            } else {
                Vec::new()
            },
        }
    }

    fn u32_at(bytes: &[u8], i: usize) -> u32 {
        u32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap())
    }

    fn u64_at(bytes: &[u8], i: usize) -> u64 {
        u64::from_le_bytes(bytes[8 * i..8 * i + 8].try_into().unwrap())
    }

    fn slice(s: &FlatStrings, i: usize) -> &[u8] {
        let start = if i == 0 {
            0
        } else {
            u32_at(&s.ends, i - 1) as usize
        };
        &s.data[start..u32_at(&s.ends, i) as usize]
    }

    /// Every field of every message reads back from the packed layout as
    /// the record layout has it.
    #[test]
    fn packed_batch_holds_what_the_records_hold() {
        let messages = [
            stored(1, "first", Some("k1"), None),
            stored(2, "", None, Some("t2")),
            stored(3, "third|x", Some(""), Some("")),
        ];
        let calls: Vec<CallMessage<'_>> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| CallMessage {
                message: m,
                partition: i as u32 * 2,
                attempt: i as u32 + 1,
            })
            .collect();
        let p = packed("transfers", &calls);
        assert_eq!(p.topic, "transfers");
        for (i, call) in calls.iter().enumerate() {
            let r = record(call);
            let id = &p.ids[16 * i..16 * i + 16];
            assert_eq!(u64::from_be_bytes(id[..8].try_into().unwrap()), r.id.hi);
            assert_eq!(u64::from_be_bytes(id[8..].try_into().unwrap()), r.id.lo);
            assert_eq!(u32_at(&p.partitions, i), r.partition);
            assert_eq!(u64_at(&p.offsets, i), r.offset);
            assert_eq!(u64_at(&p.timestamps_ms, i), r.timestamp_ms);
            assert_eq!(u32_at(&p.attempts, i), r.attempt);
            assert_eq!(slice(&p.payloads, i), &r.payload[..]);
            let index = i as u32;
            let key = (p.present[i] & PRESENT_KEY != 0).then(|| slice(&p.keys, i).to_vec());
            assert_eq!(key, r.key);
            let tag = (p.present[i] & PRESENT_TAG != 0)
                .then(|| String::from_utf8(slice(&p.tags, i).to_vec()).unwrap());
            assert_eq!(tag, r.tag);
            let headers: Vec<(String, String)> = p
                .headers
                .iter()
                .filter(|(m, _)| *m == index)
                .map(|(_, h)| (h.name.clone(), h.value.clone()))
                .collect();
            let expected: Vec<(String, String)> = r
                .headers
                .iter()
                .map(|h| (h.name.clone(), h.value.clone()))
                .collect();
            assert_eq!(headers, expected);
        }
        assert_eq!(p.count, 3);
        // A present empty key or tag is not missing.
        assert_eq!(
            p.present,
            vec![PRESENT_KEY, PRESENT_TAG, PRESENT_KEY | PRESENT_TAG]
        );
    }

    #[test]
    fn packed_outcomes_unpack_in_order_and_refuse_what_does_not_add_up() {
        let packed = |kinds: &[u8], retry_ms: &[u32], reasons: &[&str]| PackedOutcomes {
            kinds: kinds.to_vec(),
            retry_ms: retry_ms.to_vec(),
            reasons: reasons.iter().map(|r| r.to_string()).collect(),
        };
        let got = unpack_outcomes(packed(&[0, 1, 2, 1, 0], &[5, 7], &["bad"])).unwrap();
        assert!(matches!(
            &got[..],
            [
                Outcome::Ack,
                Outcome::Retry(5),
                Outcome::DeadLetter(r),
                Outcome::Retry(7),
                Outcome::Ack
            ] if r == "bad"
        ));
        assert!(unpack_outcomes(packed(&[], &[], &[])).unwrap().is_empty());
        let error = |p| unpack_outcomes(p).unwrap_err();
        assert!(error(packed(&[0, 3], &[], &[])).contains("kind 3 at 1"));
        assert!(error(packed(&[1, 1], &[5], &[])).contains("retry at 1 without its delay"));
        assert!(error(packed(&[2], &[], &[])).contains("dead letter at 0 without its reason"));
        assert!(error(packed(&[0], &[5], &[])).contains("more retry delays or reasons"));
        assert!(error(packed(&[2], &[], &["a", "b"])).contains("more retry delays or reasons"));
    }
}
