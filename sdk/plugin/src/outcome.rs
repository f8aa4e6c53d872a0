//! What to do with a message.

use std::time::Duration;

use crate::bindings::msmq::plugin::types as wit;

/// What to do with one message of a batch.
///
/// [`Plugin::handle`](crate::Plugin::handle) returns one per message, in the
/// order of the batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Done: the message is never delivered again.
    Ack,
    /// Deliver the message again after this many milliseconds (its
    /// [`attempt`](crate::Message::attempt) goes up by one).
    Retry(u32),
    /// Move the message to the plugin's dead-letter topic with this reason.
    DeadLetter(String),
}

impl Outcome {
    /// Deliver the message again after `after_ms` milliseconds.
    pub fn retry(after_ms: u32) -> Self {
        Outcome::Retry(after_ms)
    }

    /// Deliver the message again after `delay` (rounded down to whole
    /// milliseconds, saturating at `u32::MAX` ms).
    pub fn retry_after(delay: Duration) -> Self {
        Outcome::Retry(u32::try_from(delay.as_millis()).unwrap_or(u32::MAX))
    }

    /// Move the message to the dead-letter topic, saying why.
    pub fn dead_letter(reason: impl Into<String>) -> Self {
        Outcome::DeadLetter(reason.into())
    }

    /// Returns `true` for [`Outcome::Ack`].
    pub fn is_ack(&self) -> bool {
        matches!(self, Outcome::Ack)
    }

    pub(crate) fn into_wit(self) -> wit::Outcome {
        match self {
            Outcome::Ack => wit::Outcome::Ack,
            Outcome::Retry(ms) => wit::Outcome::Retry(ms),
            Outcome::DeadLetter(reason) => wit::Outcome::DeadLetter(reason),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constructors() {
        assert_eq!(Outcome::retry(5), Outcome::Retry(5));
        assert_eq!(
            Outcome::retry_after(Duration::from_secs(2)),
            Outcome::Retry(2000)
        );
        assert_eq!(
            Outcome::retry_after(Duration::from_secs(u64::MAX)),
            Outcome::Retry(u32::MAX)
        );
        assert_eq!(
            Outcome::dead_letter("bad"),
            Outcome::DeadLetter("bad".into())
        );
        assert!(Outcome::Ack.is_ack());
        assert!(matches!(Outcome::Ack.into_wit(), wit::Outcome::Ack));
    }
}
