//! QUIC transport settings shared by the broker and the client, so both ends
//! agree on windows, stream counts and timeouts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Concurrent requests one connection may have in flight (one stream each).
pub const STREAMS_PER_CONNECTION_MAX: u32 = 1024;
/// Flow-control window of one stream: at least one full frame of a batch.
pub const STREAM_WINDOW_BYTES: u32 = 16 * 1024 * 1024;
/// Flow-control window of one connection.
pub const CONNECTION_WINDOW_BYTES: u32 = 64 * 1024 * 1024;
/// What the broker lets one connection send beyond what it has read: the
/// most a connection's streams can park in the broker before their frames
/// are reserved in its request memory. A reserved frame gets credit for its
/// whole length on top, so this bounds only what waits, not what flows.
pub const BROKER_CONNECTION_WINDOW_BYTES: u32 = 128 * 1024;
/// How far one request stream may run ahead of the broker's reads: as far
/// as the client's, since the connection window above is what bounds the
/// bytes that wait; a reserved frame should flow at full speed.
pub const BROKER_STREAM_WINDOW_BYTES: u32 = STREAM_WINDOW_BYTES;
/// A connection with no traffic (keep-alives count) for this long is closed.
pub const IDLE_TIMEOUT_MS: u32 = 30_000;
/// Keep-alive period; well under the idle timeout.
pub const KEEP_ALIVE_MS: u64 = 5_000;
/// Largest UDP payload path-MTU discovery probes for, and the largest an
/// endpoint says it accepts (quinn's default, 1472, caps discovery at
/// Ethernet's size even on loopback). Loopback and jumbo-frame networks
/// carry it; elsewhere the probes fail harmlessly and 1200+ is used. On
/// loopback a 100 KB request goes in 16 datagrams instead of 70. Bounded by
/// quinn's batches of 10 datagrams in one segmented UDP send, which must
/// stay under the 65,507 bytes a UDP datagram can carry: past it the kernel
/// refuses the whole batch, which looks like loss.
pub const MTU_PROBE_BYTES_MAX: u16 = 6500;
/// Datagrams quinn puts in one segmented UDP send.
pub const DATAGRAMS_PER_SEND_MAX: usize = 10;
/// The most one UDP datagram carries over IPv4 (65,535 less the IP and UDP
/// headers).
pub const UDP_DATAGRAM_BYTES_MAX: usize = 65_507;
const _: () =
    assert!(MTU_PROBE_BYTES_MAX as usize * DATAGRAMS_PER_SEND_MAX <= UDP_DATAGRAM_BYTES_MAX);

/// Kernel receive and send buffer asked for each UDP socket. Datagrams that
/// arrive while the process is busy wait here; one dropped for want of room
/// costs its sender a loss-recovery timeout (at least the peer's 25 ms
/// maximum ACK delay), which is what a produce's p99 showed before. Linux
/// caps it at `net.core.rmem_max` / `wmem_max`.
pub const UDP_SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// A UDP socket bound to `addr` with [`UDP_SOCKET_BUFFER_BYTES`] buffers
/// (or what the kernel allows), ready for a quinn endpoint. Returns the
/// receive buffer size the kernel granted beside it.
pub fn bind_udp(addr: SocketAddr) -> std::io::Result<(std::net::UdpSocket, usize)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // A smaller buffer than asked for is no reason to fail: the caller can
    // say so.
    let _ = socket.set_recv_buffer_size(UDP_SOCKET_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(UDP_SOCKET_BUFFER_BYTES);
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    let granted = socket.recv_buffer_size().unwrap_or(0);
    Ok((socket.into(), granted))
}

/// Endpoint settings shared by the broker and the client: datagrams up to
/// [`MTU_PROBE_BYTES_MAX`] accepted, so path-MTU discovery can reach it.
pub fn endpoint_config(mut config: quinn::EndpointConfig) -> quinn::EndpointConfig {
    config
        .max_udp_payload_size(MTU_PROBE_BYTES_MAX)
        .expect("MTU_PROBE_BYTES_MAX is a valid UDP payload size");
    config
}

/// The client's transport configuration: wide receive windows, because
/// what it receives are replies it asked for.
pub fn transport_config() -> Arc<quinn::TransportConfig> {
    Arc::new(config_with(
        STREAMS_PER_CONNECTION_MAX,
        STREAM_WINDOW_BYTES,
        CONNECTION_WINDOW_BYTES,
    ))
}

/// The broker's, with the number of streams a client may open at once (its
/// `streams_per_connection_max`) and narrow receive windows: request bytes
/// count against its request memory, and flow control is what holds a
/// sender back while its frame waits.
pub fn broker_transport_config(streams_max: u32) -> Arc<quinn::TransportConfig> {
    Arc::new(config_with(
        streams_max,
        BROKER_STREAM_WINDOW_BYTES,
        BROKER_CONNECTION_WINDOW_BYTES,
    ))
}

fn config_with(
    streams_max: u32,
    stream_window_bytes: u32,
    connection_window_bytes: u32,
) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(streams_max.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window(stream_window_bytes.into())
        .receive_window(connection_window_bytes.into())
        .send_window(CONNECTION_WINDOW_BYTES as u64)
        .max_idle_timeout(Some(quinn::VarInt::from_u32(IDLE_TIMEOUT_MS).into()))
        .keep_alive_interval(Some(Duration::from_millis(KEEP_ALIVE_MS)));
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MTU_PROBE_BYTES_MAX);
    t.mtu_discovery_config(Some(mtu));
    t
}
