//! QUIC transport settings shared by the broker and the client, so both ends
//! agree on windows, stream counts and timeouts.

use std::sync::Arc;
use std::time::Duration;

/// Concurrent requests one connection may have in flight (one stream each).
pub const STREAMS_PER_CONNECTION_MAX: u32 = 1024;
/// Flow-control window of one stream: at least one full frame of a batch.
pub const STREAM_WINDOW_BYTES: u32 = 16 * 1024 * 1024;
/// Flow-control window of one connection.
pub const CONNECTION_WINDOW_BYTES: u32 = 64 * 1024 * 1024;
/// A connection with no traffic (keep-alives count) for this long is closed.
pub const IDLE_TIMEOUT_MS: u32 = 30_000;
/// Keep-alive period; well under the idle timeout.
pub const KEEP_ALIVE_MS: u64 = 5_000;
/// Largest UDP payload path-MTU discovery probes for. Loopback and jumbo-frame
/// networks carry it; elsewhere the probes fail harmlessly and 1200+ is used.
pub const MTU_PROBE_BYTES_MAX: u16 = 8952;

/// The transport configuration both ends use.
pub fn transport_config() -> Arc<quinn::TransportConfig> {
    transport_config_with_streams(STREAMS_PER_CONNECTION_MAX)
}

/// The same, with the number of streams the peer may open at once (the
/// broker's `streams_per_connection_max`).
pub fn transport_config_with_streams(streams_max: u32) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(streams_max.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window(STREAM_WINDOW_BYTES.into())
        .receive_window(CONNECTION_WINDOW_BYTES.into())
        .send_window(CONNECTION_WINDOW_BYTES as u64)
        .max_idle_timeout(Some(quinn::VarInt::from_u32(IDLE_TIMEOUT_MS).into()))
        .keep_alive_interval(Some(Duration::from_millis(KEEP_ALIVE_MS)));
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MTU_PROBE_BYTES_MAX);
    t.mtu_discovery_config(Some(mtu));
    Arc::new(t)
}
