//! The MSMQ wire protocol, shared by the broker and every client.
//!
//! This crate owns the bytes that cross the network and nothing else: the
//! frame format ([`frame`]), the request and reply types ([`messages`]) and
//! the stable numeric error codes ([`ErrorCode`]). `PROTOCOL.md` at the
//! repository root documents the same things for authors of clients in other
//! languages; the two must change together.
//!
//! Invariants:
//! - Decoding never panics, whatever the input; every failure is a
//!   [`FrameError`].
//! - Variant order of every enum and field order of every struct is part of
//!   the wire format (postcard encodes enum variants by index): append new
//!   variants at the end, never reorder.

pub mod error_code;
pub mod filter;
pub mod frame;
pub mod messages;
pub mod names;
pub mod plugins;

pub use error_code::ErrorCode;
pub use frame::{
    decode_body, decode_frame, encode_frame, frame_body, FrameError, FRAME_BYTES_MAX,
    FRAME_HEADER_BYTES,
};
pub use messages::*;
pub use plugins::*;
pub use serde_bytes;

/// ALPN protocol id negotiated in the TLS handshake; it carries the protocol
/// version, so an incompatible client fails at connect time.
pub const ALPN: &[u8] = b"msmq/1";

/// Version of this protocol, reported by `Ping`.
pub const PROTOCOL_VERSION: u16 = 1;

/// Default port of the broker's QUIC listener.
pub const DEFAULT_PORT: u16 = 7171;
