//! Stable numeric error codes carried in [`crate::ErrorReply`].
//!
//! Codes never change meaning once released; unknown codes from a newer
//! broker decode fine and print as `UNKNOWN(n)`.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A numeric error code. Use the associated constants.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ErrorCode(pub u16);

macro_rules! codes {
    ($( $(#[$doc:meta])* $name:ident = $num:expr, retryable = $retry:expr; )*) => {
        impl ErrorCode {
            $( $(#[$doc])* pub const $name: ErrorCode = ErrorCode($num); )*

            /// Every defined code, in numeric order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name),*];

            /// The code's stable name, as written in `PROTOCOL.md`.
            pub fn name(self) -> &'static str {
                match self.0 {
                    $( $num => stringify!($name), )*
                    _ => "UNKNOWN",
                }
            }

            /// Whether the same request may succeed if sent again later.
            pub fn is_retryable(self) -> bool {
                match self.0 {
                    $( $num => $retry, )*
                    _ => false,
                }
            }
        }
    };
}

codes! {
    /// The request body could not be decoded, or a field is malformed.
    BAD_REQUEST = 1, retryable = false;
    /// A frame was larger than the receiver accepts.
    FRAME_TOO_LARGE = 2, retryable = false;
    /// The named topic does not exist.
    UNKNOWN_TOPIC = 3, retryable = false;
    /// A topic with that name already exists.
    TOPIC_EXISTS = 4, retryable = false;
    /// An argument is out of range (partition count, name, limits).
    INVALID_ARGUMENT = 5, retryable = false;
    /// One message is larger than `message_bytes_max`.
    MESSAGE_TOO_LARGE = 6, retryable = false;
    /// A produce batch is larger than `batch_bytes_max` or `batch_messages_max`.
    BATCH_TOO_LARGE = 7, retryable = false;
    /// The partition does not exist in the topic.
    UNKNOWN_PARTITION = 8, retryable = false;
    /// The requested offset is outside the partition's log.
    OFFSET_OUT_OF_RANGE = 9, retryable = false;
    /// The consumer-group member id is unknown (expired or never joined): join again.
    UNKNOWN_MEMBER = 10, retryable = false;
    /// The group was rebalanced: the member no longer owns that partition.
    REBALANCED = 11, retryable = true;
    /// The storage layer failed; the request was not applied.
    STORAGE_ERROR = 12, retryable = true;
    /// The broker is shutting down; nothing was applied. Retry against the restarted broker.
    SHUTTING_DOWN = 13, retryable = true;
    /// The broker is overloaded; retry after `retry_after_ms`.
    BUSY = 14, retryable = true;
    /// An unexpected broker fault; the request was not applied.
    INTERNAL = 15, retryable = true;
    /// The request is valid but names a group that does not exist.
    UNKNOWN_GROUP = 16, retryable = false;
    /// No such transaction (never existed, or resolved and since forgotten).
    UNKNOWN_TRANSACTION = 17, retryable = false;
    /// The transaction was already resolved the other way (committed vs
    /// rolled back; a commit of a transaction the broker discarded);
    /// nothing changed.
    TRANSACTION_RESOLVED = 18, retryable = false;
    /// The group has live members; stop them before resetting its offsets.
    GROUP_ACTIVE = 19, retryable = true;
    /// The partition's backlog (messages its slowest consumer group has not
    /// consumed) reached `backlog_messages_max`; retry after `retry_after_ms`.
    BACKLOG_FULL = 20, retryable = true;
    /// No plugin of that name is deployed.
    UNKNOWN_PLUGIN = 21, retryable = false;
    /// The plugin component was refused: not a component, wrong world,
    /// imports it may not have, too large, or its `init` failed.
    PLUGIN_REFUSED = 22, retryable = false;
    /// Authentication is on and the connection has not presented a valid
    /// token (none, unknown, or revoked).
    UNAUTHENTICATED = 23, retryable = false;
    /// The principal may not do this.
    FORBIDDEN = 24, retryable = false;
    /// The connection sent requests faster than
    /// `requests_per_sec_per_connection_max`; retry after `retry_after_ms`.
    /// Also the close code of a connection that kept sending past refusals.
    RATE_LIMITED = 25, retryable = true;
    /// A connection limit is reached: the principal's
    /// (`connections_per_principal_max`), the unauthenticated address's
    /// (`unauthenticated_connections_per_address_max`) or the broker's
    /// (`connections_max`).
    TOO_MANY_CONNECTIONS = 26, retryable = true;
    /// The broker's disk has less free space than `disk_free_min`: what
    /// grows the log is refused until space returns; retry after
    /// `retry_after_ms`.
    DISK_FULL = 27, retryable = true;
    /// The producer id has a newer epoch (another `InitProducer` for it):
    /// this producer instance is a zombie and must stop.
    PRODUCER_FENCED = 28, retryable = false;
    /// The broker holds no such producer id for this principal: never
    /// given out, or expired after `producer_idle_expiry`. Get a new one
    /// with `InitProducer`; deduplication starts again from there.
    UNKNOWN_PRODUCER = 29, retryable = false;
    /// A sequenced request does not continue the producer's sequence (a
    /// request before it is missing or still in flight); the message says
    /// which sequence was expected. Retryable: an earlier request in flight
    /// may yet arrive.
    SEQUENCE_OUT_OF_ORDER = 30, retryable = true;
    /// The request's sequence numbers were stored already, longer ago than
    /// the broker remembers replies for (the producer's last
    /// `PRODUCER_REQUESTS_REMEMBERED` requests): nothing was stored again,
    /// and the original acknowledgement is gone.
    DUPLICATE_SEQUENCE = 31, retryable = false;
    /// The broker holds `producers_max` producer ids; retry after
    /// `retry_after_ms` (idle ids expire) or produce without idempotence.
    PRODUCERS_FULL = 32, retryable = true;
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name(), self.0)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_named() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.0), "duplicate code {}", code.0);
            assert_ne!(code.name(), "UNKNOWN");
        }
        assert_eq!(ErrorCode(9999).name(), "UNKNOWN");
        assert!(!ErrorCode(9999).is_retryable());
        assert!(ErrorCode::BUSY.is_retryable());
    }
}
