//! Batches and messages handed to a plugin.

use std::fmt;
use std::rc::Rc;
use std::str::Utf8Error;

use crate::bindings::msmq::plugin::types as wit;

/// The broker-assigned id of a message: 16 bytes, stable across retries and
/// redeliveries. Use it for idempotency.
///
/// It displays (and [`to_hex`](MessageId::to_hex) formats it) as 32 lowercase
/// hexadecimal digits, `hi` then `lo`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct MessageId {
    /// The high 8 bytes.
    pub hi: u64,
    /// The low 8 bytes.
    pub lo: u64,
}

impl MessageId {
    /// Formats the id as 32 lowercase hexadecimal digits.
    pub fn to_hex(&self) -> String {
        format!("{:016x}{:016x}", self.hi, self.lo)
    }

    /// Parses 32 hexadecimal digits (either case); `None` if `s` is anything
    /// else.
    pub fn from_hex(s: &str) -> Option<Self> {
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let hi = u64::from_str_radix(&s[..16], 16).ok()?;
        let lo = u64::from_str_radix(&s[16..], 16).ok()?;
        Some(MessageId { hi, lo })
    }

    /// The id as 16 big-endian bytes.
    pub fn to_bytes(&self) -> [u8; 16] {
        self.as_u128().to_be_bytes()
    }

    /// The id as one 128-bit integer (`hi` in the upper half).
    pub fn as_u128(&self) -> u128 {
        (u128::from(self.hi) << 64) | u128::from(self.lo)
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}{:016x}", self.hi, self.lo)
    }
}

/// A string header of a message.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Header {
    /// The header's name.
    pub name: String,
    /// The header's value.
    pub value: String,
}

/// One message of a [`Batch`].
#[derive(Clone, Debug)]
pub struct Message {
    topic: Rc<str>,
    id: MessageId,
    partition: u32,
    offset: u64,
    timestamp_ms: u64,
    attempt: u32,
    key: Option<Vec<u8>>,
    tag: Option<String>,
    headers: Vec<Header>,
    payload: Vec<u8>,
}

impl Message {
    /// The message's id, stable across retries and redeliveries.
    pub fn id(&self) -> MessageId {
        self.id
    }

    /// The message's id as 32 lowercase hexadecimal digits, ready to use in a
    /// state key such as `seen/<id>`.
    pub fn id_hex(&self) -> String {
        self.id.to_hex()
    }

    /// The topic the message was consumed from (the batch's topic).
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The partition of the topic the message is in.
    pub fn partition(&self) -> u32 {
        self.partition
    }

    /// The message's offset in its partition.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Broker time the message was appended, in ms since the Unix epoch.
    pub fn timestamp_ms(&self) -> u64 {
        self.timestamp_ms
    }

    /// 1 on first delivery, then 2, 3, ... for retries and for redeliveries
    /// after a failed batch.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// `true` if this is not the first delivery of the message
    /// (`attempt() > 1`).
    pub fn is_redelivery(&self) -> bool {
        self.attempt > 1
    }

    /// The payload bytes.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The payload as UTF-8 text, or the UTF-8 error if it is not valid text.
    pub fn payload_str(&self) -> Result<&str, Utf8Error> {
        std::str::from_utf8(&self.payload)
    }

    /// The key bytes, if the message has a key.
    pub fn key(&self) -> Option<&[u8]> {
        self.key.as_deref()
    }

    /// The key as UTF-8 text; `None` if the message has no key or the key is
    /// not valid UTF-8.
    pub fn key_str(&self) -> Option<&str> {
        self.key().and_then(|k| std::str::from_utf8(k).ok())
    }

    /// The tag, if the message has one.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// All headers, in the order they were given.
    pub fn headers(&self) -> &[Header] {
        &self.headers
    }

    /// The value of the first header named exactly `name`, if any.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|h| h.name == name)
            .map(|h| h.value.as_str())
    }

    fn from_wit(topic: Rc<str>, m: wit::Message) -> Self {
        Message {
            topic,
            id: MessageId {
                hi: m.id.hi,
                lo: m.id.lo,
            },
            partition: m.partition,
            offset: m.offset,
            timestamp_ms: m.timestamp_ms,
            attempt: m.attempt,
            key: m.key,
            tag: m.tag,
            headers: m
                .headers
                .into_iter()
                .map(|h| Header {
                    name: h.name,
                    value: h.value,
                })
                .collect(),
            payload: m.payload,
        }
    }
}

/// Messages from one partition of one topic, in offset order (retries may come
/// out of order).
#[derive(Clone, Debug)]
pub struct Batch {
    topic: Rc<str>,
    messages: Vec<Message>,
}

impl Batch {
    /// The topic the messages were consumed from.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The messages, in delivery order.
    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    /// Iterates over the messages, in delivery order.
    pub fn iter(&self) -> std::slice::Iter<'_, Message> {
        self.messages.iter()
    }

    /// The number of messages (and of outcomes to return).
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// `true` if the batch has no messages.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    pub(crate) fn from_wit(batch: wit::Batch) -> Self {
        let topic: Rc<str> = Rc::from(batch.topic);
        let messages = batch
            .messages
            .into_iter()
            .map(|m| Message::from_wit(Rc::clone(&topic), m))
            .collect();
        Batch { topic, messages }
    }
}

impl<'a> IntoIterator for &'a Batch {
    type Item = &'a Message;
    type IntoIter = std::slice::Iter<'a, Message>;

    fn into_iter(self) -> Self::IntoIter {
        self.messages.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_hex_roundtrip() {
        let id = MessageId {
            hi: 0x0123_4567_89ab_cdef,
            lo: 0xf,
        };
        assert_eq!(id.to_hex(), "0123456789abcdef000000000000000f");
        assert_eq!(id.to_string(), id.to_hex());
        assert_eq!(MessageId::from_hex(&id.to_hex()), Some(id));
        assert_eq!(
            MessageId::from_hex("0123456789ABCDEF000000000000000F"),
            Some(id)
        );
        assert_eq!(MessageId::from_hex("xyz"), None);
        assert_eq!(
            MessageId::from_hex("+123456789abcdef000000000000000f"),
            None
        );
        assert_eq!(id.to_bytes()[0], 0x01);
        assert_eq!(id.to_bytes()[15], 0x0f);
    }

    #[test]
    fn batch_conversion() {
        let batch = Batch::from_wit(wit::Batch {
            topic: "transfers".into(),
            messages: vec![wit::Message {
                id: wit::MessageId { hi: 1, lo: 2 },
                partition: 3,
                offset: 4,
                timestamp_ms: 5,
                attempt: 2,
                key: Some(b"alice".to_vec()),
                tag: Some("t".into()),
                headers: vec![wit::Header {
                    name: "h".into(),
                    value: "v".into(),
                }],
                payload: b"tx-1|alice|bob|100".to_vec(),
            }],
        });
        assert_eq!(batch.topic(), "transfers");
        assert_eq!(batch.len(), 1);
        let m = &batch.messages()[0];
        assert_eq!(m.topic(), "transfers");
        assert_eq!(m.id_hex(), "00000000000000010000000000000002");
        assert_eq!((m.partition(), m.offset(), m.timestamp_ms()), (3, 4, 5));
        assert!(m.is_redelivery());
        assert_eq!(m.key_str(), Some("alice"));
        assert_eq!(m.tag(), Some("t"));
        assert_eq!(m.header("h"), Some("v"));
        assert_eq!(m.header("x"), None);
        assert_eq!(m.payload_str(), Ok("tx-1|alice|bob|100"));
        assert_eq!((&batch).into_iter().count(), 1);
    }
}
