//! Errors reported by the host.

use std::fmt;

use crate::bindings::msmq::plugin::types as wit;

/// Why the broker refused a [`publish`](crate::publish) or a
/// [`state::put`](crate::state::put).
///
/// A refusal does not fail the batch: the plugin decides what it means for the
/// message at hand (typically [`Outcome::retry`](crate::Outcome::retry) or
/// [`Outcome::dead_letter`](crate::Outcome::dead_letter)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostError {
    /// The plugin was not deployed with the right to publish to this topic
    /// (see `--publish-to`).
    NotAllowed(String),
    /// No such topic.
    UnknownTopic(String),
    /// A size limit (message, key, value, or per-batch total) was exceeded.
    TooLarge(String),
    /// Anything else, with a description.
    Other(String),
}

impl HostError {
    /// The broker's description of the refusal.
    pub fn message(&self) -> &str {
        match self {
            HostError::NotAllowed(m)
            | HostError::UnknownTopic(m)
            | HostError::TooLarge(m)
            | HostError::Other(m) => m,
        }
    }
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostError::NotAllowed(m) => write!(f, "not allowed: {m}"),
            HostError::UnknownTopic(m) => write!(f, "unknown topic: {m}"),
            HostError::TooLarge(m) => write!(f, "too large: {m}"),
            HostError::Other(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for HostError {}

impl From<wit::HostError> for HostError {
    fn from(e: wit::HostError) -> Self {
        match e {
            wit::HostError::NotAllowed(m) => HostError::NotAllowed(m),
            wit::HostError::UnknownTopic(m) => HostError::UnknownTopic(m),
            wit::HostError::TooLarge(m) => HostError::TooLarge(m),
            wit::HostError::Other(m) => HostError::Other(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display() {
        let e = HostError::NotAllowed("topic `x`".into());
        assert_eq!(e.to_string(), "not allowed: topic `x`");
        assert_eq!(e.message(), "topic `x`");
        assert_eq!(HostError::Other("boom".into()).to_string(), "boom");
    }
}
