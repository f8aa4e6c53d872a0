//! Publishing new messages.

use crate::bindings::msmq::plugin::{host, types as wit};
use crate::{Header, HostError};

/// Starts building a message to publish to `topic`; finish with
/// [`Publish::send`].
///
/// The message becomes visible to consumers only if the batch being handled
/// commits. The plugin may publish only to the topics it was deployed with
/// (`--publish-to`); anything else is refused with
/// [`HostError::NotAllowed`].
///
/// ```ignore
/// use msmq_plugin::{publish, Outcome};
///
/// match publish("notify", "tx-1|alice|12|40").key("alice").send() {
///     Ok(()) => Outcome::Ack,
///     Err(e) => Outcome::dead_letter(format!("publish refused: {e}")),
/// }
/// ```
pub fn publish(topic: impl Into<String>, payload: impl Into<Vec<u8>>) -> Publish {
    Publish::new(topic, payload)
}

/// A message being built for [`publish`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use = "nothing is published until `.send()` is called"]
pub struct Publish {
    topic: String,
    payload: Vec<u8>,
    key: Option<Vec<u8>>,
    tag: Option<String>,
    headers: Vec<Header>,
}

impl Publish {
    /// A message for `topic` with `payload`, no key, no tag and no headers.
    pub fn new(topic: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        Publish {
            topic: topic.into(),
            payload: payload.into(),
            key: None,
            tag: None,
            headers: Vec::new(),
        }
    }

    /// Sets the key (which picks the partition).
    pub fn key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Sets the tag.
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tag = Some(tag.into());
        self
    }

    /// Adds a header (headers keep the order they were added in).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push(Header {
            name: name.into(),
            value: value.into(),
        });
        self
    }

    /// Publishes the message; it becomes visible only if the batch commits.
    ///
    /// # Panics
    ///
    /// On a non-`wasm32` target (there is no broker).
    pub fn send(self) -> Result<(), HostError> {
        let message = wit::NewMessage {
            topic: self.topic,
            payload: self.payload,
            key: self.key,
            tag: self.tag,
            headers: self
                .headers
                .into_iter()
                .map(|h| wit::Header {
                    name: h.name,
                    value: h.value,
                })
                .collect(),
        };
        host::publish(&message).map_err(HostError::from)
    }
}
