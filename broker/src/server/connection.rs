//! Accepting connections and reading one request frame per stream.
//!
//! Each connection is held to the limits of [`super::limits`]: it counts
//! against its principal's connections, its requests against its rate and
//! its unanswered request bytes against its in-flight budget, its
//! principal's share of request memory and the broker-wide budget
//! ([`super::memory`]). A frame is read only once all three hold its length;
//! until then its stream is left unread and the connection's narrow QUIC
//! receive window holds the sender back. The reservation then grants the
//! sender credit for exactly that frame.
//!
//! A framing error (truncated frame, oversize header, bytes after the body)
//! closes the whole connection with the error code and a reason: the peer's
//! framing can no longer be trusted. A body that frames correctly but does
//! not decode gets a `BAD_REQUEST` reply on its stream.

use super::limits::{Admission, ConnectionAdmission, ConnectionRefusal, PrincipalShared};
use super::memory::FrameTooLarge;
use super::{handlers, ServerState};
use msmq_protocol::{
    decode_body, encode_frame, ErrorCode, ErrorReply, Reply, Request, FRAME_BYTES_MAX,
    FRAME_HEADER_BYTES,
};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio_util::task::TaskTracker;

/// How long a request task waits for the peer to acknowledge its reply.
const REPLY_DELIVERY_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Per-connection facts handlers may need.
pub struct ConnectionContext {
    pub id: u64,
    pub remote: std::net::SocketAddr,
    /// The connection itself, for requests the broker sends back (check-backs).
    pub conn: quinn::Connection,
    /// (token id, principal) once the connection authenticated.
    pub principal: std::sync::Mutex<Option<(String, String)>>,
    /// The key this connection is counted under in `ServerState::connections`;
    /// taken (and released) once, when the connection's accept loop ends.
    count_key: std::sync::Mutex<Option<String>>,
    rate: ConnectionAdmission,
    /// The rate and memory share of all connections of `count_key`.
    shared: std::sync::Mutex<Arc<PrincipalShared>>,
    in_flight_bytes: tokio::sync::Semaphore,
    /// Flow-control credit the peer holds that no reservation stands
    /// behind: what frames it abandoned left unused. Held while the window is
    /// raised and lowered for a grant, so two grants cannot undo each other.
    unbacked_credit: std::sync::Mutex<u64>,
    /// Streams that failed framing, and the first one's reason: a client
    /// dropping many half-sent requests fails them all at once, and that is
    /// logged once, when the connection ends.
    framing_errors: std::sync::atomic::AtomicU32,
    first_framing_error: std::sync::Mutex<Option<(ErrorCode, String)>>,
}

impl ConnectionContext {
    /// Count this connection under `principal` instead of its current key;
    /// `Err(open)` when the principal already has its limit open.
    /// A connection that already ended is not counted again (`Err(0)`).
    pub fn recount_as(&self, state: &ServerState, principal: &str) -> Result<(), u32> {
        let mut key = self.count_key.lock().expect("count key lock");
        let Some(current) = key.as_mut() else {
            return Err(0);
        };
        if current == principal {
            return Ok(());
        }
        state.connections.recount(
            current,
            principal,
            state.config.connections_per_principal_max,
        )?;
        *current = principal.to_string();
        *self.shared.lock().expect("principal limits lock") = principal_shared(state, principal);
        Ok(())
    }

    /// Let the peer send `bytes` more than the connection's receive window,
    /// once: the window is raised and lowered at once, so quinn grants the
    /// credit and counts the shrink as a debt that reading these bytes pays
    /// off. Unread bytes of a connection stay within the base window plus
    /// what was reserved and not yet read.
    /// Credit the peer already holds unbacked is spent first.
    fn grant_receive_credit(&self, bytes: usize) {
        use msmq_client::transport::BROKER_CONNECTION_WINDOW_BYTES as BASE;
        let mut unbacked = self.unbacked_credit.lock().expect("credit lock");
        let held = (*unbacked).min(bytes as u64);
        *unbacked -= held;
        let grant = bytes as u64 - held;
        if grant == 0 {
            return;
        }
        let raised = quinn::VarInt::from_u64(u64::from(BASE) + grant).unwrap_or(quinn::VarInt::MAX);
        self.conn.set_receive_window(raised);
        self.conn.set_receive_window(BASE.into());
    }

    /// A reserved frame's stream ended (reset, timed out) with `unread` of
    /// its granted bytes never sent: the peer keeps that credit and could
    /// park other streams' bytes with it. Past
    /// [`UNBACKED_CREDIT_BYTES_MAX`] the connection is closed.
    fn abandoned(&self, unread: u64) {
        if self.conn.close_reason().is_some() {
            // The whole connection went: its credit with it.
            return;
        }
        let mut unbacked = self.unbacked_credit.lock().expect("credit lock");
        *unbacked += unread;
        if *unbacked > UNBACKED_CREDIT_BYTES_MAX {
            let reason = format!(
                "request frames whose streams ended early left {} bytes of granted flow-control \
                 credit unused (limit {UNBACKED_CREDIT_BYTES_MAX}): finish every frame you start",
                *unbacked
            );
            crate::metrics::global().client_limit("abandoned_frames");
            tracing::warn!(conn = self.id, remote = %self.remote, %reason, "closing connection");
            close_with(&self.conn, ErrorCode::BAD_REQUEST, &reason);
        }
    }

    /// The key the connection is counted under (empty once it ended).
    pub fn count_key(&self) -> String {
        let key = self.count_key.lock().expect("count key lock");
        key.clone().unwrap_or_default()
    }
}

fn principal_shared(state: &ServerState, key: &str) -> Arc<PrincipalShared> {
    state.connections.principal_shared(key, || PrincipalShared {
        rate: super::limits::RequestRate::new(state.config.requests_per_sec_per_principal_max),
        memory: state.request_memory.principal_share(),
    })
}

/// Why a new connection of `key` is refused and for how many more ms, while
/// a cut-off ban lasts.
pub fn banned(state: &ServerState, key: &str) -> Option<(String, u32)> {
    let left = state.connections.banned_for(key)?;
    crate::metrics::global().client_limit("banned");
    let left_ms = u32::try_from(left.as_millis()).unwrap_or(u32::MAX).max(1);
    Some((
        format!(
            "{key} was cut off for flooding; new connections are refused for {left_ms} more ms (cutoff_ban)"
        ),
        left_ms,
    ))
}

/// The key an unauthenticated connection is counted under: its address (an
/// IPv6 host by its /64, which one host usually has whole). Principal names
/// cannot contain ':', so no principal can share it.
fn address_key(remote: std::net::SocketAddr) -> String {
    match remote.ip().to_canonical() {
        std::net::IpAddr::V4(v4) => format!("address:{v4}"),
        std::net::IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("address:{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
    }
}

/// The principal of a verified client certificate: its common name. The id
/// `cert:<name>` marks it as not revocable by token.
fn certificate_principal(conn: &quinn::Connection) -> Option<(String, String)> {
    let chain = conn
        .peer_identity()?
        .downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
        .ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(chain.first()?.as_ref()).ok()?;
    let name = cert
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    crate::auth::validate_principal(&name).ok()?;
    Some((
        format!("{}{name}", crate::auth::CERTIFICATE_ID_PREFIX),
        name,
    ))
}

pub(super) async fn accept_loop(
    state: Arc<ServerState>,
    endpoint: quinn::Endpoint,
    requests: TaskTracker,
) {
    while let Some(incoming) = endpoint.accept().await {
        if state.is_shutting_down() {
            incoming.refuse();
            continue;
        }
        // A banned address is refused before the handshake costs anything.
        if state
            .connections
            .banned_for(&address_key(incoming.remote_address()))
            .is_some()
        {
            crate::metrics::global().client_limit("banned");
            incoming.refuse();
            continue;
        }
        let state = state.clone();
        let requests = requests.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => serve_connection(state, conn, requests).await,
                Err(e) => tracing::debug!(%remote, error = %e, "handshake failed"),
            }
        });
    }
}

async fn serve_connection(state: Arc<ServerState>, conn: quinn::Connection, requests: TaskTracker) {
    let principal = certificate_principal(&conn);
    let config = &state.config;
    let (count_key, key_limit, key_limit_name, key_metric) = match &principal {
        Some((_, name)) => (
            name.clone(),
            config.connections_per_principal_max,
            "connections_per_principal_max",
            "connections",
        ),
        None => (
            address_key(conn.remote_address()),
            config.unauthenticated_connections_per_address_max,
            "unauthenticated_connections_per_address_max",
            "address_connections",
        ),
    };
    if let Some((reason, _)) = banned(&state, &count_key) {
        tracing::debug!(remote = %conn.remote_address(), %reason, "connection refused");
        return close_with(&conn, ErrorCode::RATE_LIMITED, &reason);
    }
    let refused = state
        .connections
        .acquire(&count_key, key_limit, config.connections_max);
    if let Err(refusal) = refused {
        let (metric, reason) = match refusal {
            ConnectionRefusal::Broker { open } => (
                "broker_connections",
                format!(
                    "the broker has {open} connections open, its limit (connections_max) is {}",
                    config.connections_max
                ),
            ),
            ConnectionRefusal::Key { open } => (
                key_metric,
                format!(
                    "{count_key} already has {open} connections open, the limit \
                     ({key_limit_name}) is {key_limit}"
                ),
            ),
        };
        crate::metrics::global().client_limit(metric);
        tracing::warn!(remote = %conn.remote_address(), %reason, "connection refused");
        return close_with(&conn, ErrorCode::TOO_MANY_CONNECTIONS, &reason);
    }
    let ctx = Arc::new(ConnectionContext {
        id: state.next_connection_id.fetch_add(1, Ordering::Relaxed),
        remote: conn.remote_address(),
        conn: conn.clone(),
        principal: std::sync::Mutex::new(principal),
        shared: std::sync::Mutex::new(principal_shared(&state, &count_key)),
        count_key: std::sync::Mutex::new(Some(count_key)),
        rate: ConnectionAdmission::new(
            state.config.requests_per_sec_per_connection_max,
            state.config.refused_requests_before_cutoff,
        ),
        in_flight_bytes: tokio::sync::Semaphore::new(
            state.config.in_flight_bytes_per_connection_max.as_u64() as usize,
        ),
        unbacked_credit: std::sync::Mutex::new(0),
        framing_errors: std::sync::atomic::AtomicU32::new(0),
        first_framing_error: std::sync::Mutex::new(None),
    });
    tracing::debug!(conn = ctx.id, remote = %ctx.remote, "connection opened");
    let reason = loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                if requests.is_closed() {
                    // Shutting down: answer nothing new; the stream is dropped unanswered.
                    drop((send, recv));
                    continue;
                }
                let shared = ctx.shared.lock().expect("principal limits lock").clone();
                let admission = ctx.rate.admit(&shared.rate);
                if let Admission::CutOff { refused } = admission {
                    cut_off(&state, &ctx, refused);
                    break quinn::ConnectionError::LocallyClosed;
                }
                let (state, ctx) = (state.clone(), ctx.clone());
                requests
                    .spawn(async move { serve_stream(&state, &ctx, admission, send, recv).await });
            }
            Err(e) => break e,
        }
    };
    if let Some(key) = ctx.count_key.lock().expect("count key lock").take() {
        state.connections.release(&key);
    }
    state.producers.remove_connection(ctx.id);
    let dropped = state.with_groups(|g, partitions_of| g.drop_connection(ctx.id, partitions_of));
    for (group, member) in dropped {
        tracing::info!(%group, member, "member's connection closed; partitions rebalanced");
    }
    let bad_streams = ctx.framing_errors.load(Ordering::Relaxed);
    let first = ctx.first_framing_error.lock().expect("framing lock").take();
    if let Some((code, first)) = first {
        tracing::warn!(conn = ctx.id, remote = %ctx.remote, %code, bad_streams, first = %first,
            "closed connection for bad framing");
    }
    tracing::debug!(conn = ctx.id, remote = %ctx.remote, %reason, "connection closed");
}

fn close_with(conn: &quinn::Connection, code: ErrorCode, reason: &str) {
    let reason: String = reason.chars().take(CLOSE_REASON_CHARS_MAX).collect();
    conn.close(code.0.into(), reason.as_bytes());
}

/// Most flow-control credit a connection may hold unbacked by a
/// reservation, from frames it started and abandoned (see
/// `ConnectionContext::abandoned`): as much as its base window again.
const UNBACKED_CREDIT_BYTES_MAX: u64 =
    msmq_client::transport::BROKER_CONNECTION_WINDOW_BYTES as u64;

/// Longest close reason sent (it travels in one QUIC frame).
const CLOSE_REASON_CHARS_MAX: usize = 200;

/// Close the connection for bad framing; the first failing stream's reason
/// goes to the client, and to the log with the count when the connection
/// ends.
fn close_for_framing(ctx: &ConnectionContext, code: ErrorCode, reason: String) {
    if ctx.framing_errors.fetch_add(1, Ordering::Relaxed) > 0 {
        tracing::debug!(conn = ctx.id, %code, %reason, "another stream with bad framing");
        return;
    }
    close_with(&ctx.conn, code, &reason);
    *ctx.first_framing_error.lock().expect("framing lock") = Some((code, reason));
}

/// Close a connection that kept sending past its rate refusals.
fn cut_off(state: &ServerState, ctx: &ConnectionContext, refused: u32) {
    crate::metrics::global().client_limit("cut_off");
    let reason = format!(
        "cut off: {refused} requests refused while told to wait, over {} requests/s \
         per connection or {} per principal; wait retry_after_ms on RATE_LIMITED",
        state.config.requests_per_sec_per_connection_max,
        state.config.requests_per_sec_per_principal_max,
    );
    let principal = ctx.count_key();
    state.connections.ban(&principal, state.config.cutoff_ban);
    tracing::warn!(conn = ctx.id, remote = %ctx.remote, %principal, %reason, "closing connection");
    close_with(&ctx.conn, ErrorCode::RATE_LIMITED, &reason);
}

async fn serve_stream(
    state: &Arc<ServerState>,
    ctx: &ConnectionContext,
    admission: Admission,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let reply = match admission {
        Admission::Refused { retry_after_ms } => {
            // A refusal reads nothing: stop the request's stream, answer at once.
            let _ = recv.stop(ErrorCode::RATE_LIMITED.0.into());
            crate::metrics::global().client_limit("rate");
            Reply::Error(ErrorReply {
                code: ErrorCode::RATE_LIMITED,
                message: format!(
                    "over {} requests/s on this connection (requests_per_sec_per_connection_max) \
                     or {} for this principal (requests_per_sec_per_principal_max)",
                    state.config.requests_per_sec_per_connection_max,
                    state.config.requests_per_sec_per_principal_max,
                ),
                retry_after_ms: Some(retry_after_ms),
            })
        }
        _ => match read_frame(state, ctx, &mut recv).await {
            Ok((body, _held)) => answer(state, ctx, &body).await,
            Err(ReadFailed::Gone) => return,
            Err(ReadFailed::TooLarge(too_large)) => {
                // Nothing of the body is read: stop the stream, answer at once.
                let _ = recv.stop(ErrorCode::FRAME_TOO_LARGE.0.into());
                crate::metrics::global().client_limit("request_memory");
                Reply::Error(ErrorReply::new(
                    ErrorCode::FRAME_TOO_LARGE,
                    too_large.to_string(),
                ))
            }
            Err(ReadFailed::TimedOut) => {
                let _ = recv.stop(ErrorCode::BAD_REQUEST.0.into());
                Reply::Error(ErrorReply::new(
                    ErrorCode::BAD_REQUEST,
                    format!(
                        "the request frame did not arrive within {:?} (request_read_timeout)",
                        state.config.request_read_timeout
                    ),
                ))
            }
        },
    };
    if state
        .reply_faults
        .as_ref()
        .is_some_and(|f| f.drop_reply(&reply))
    {
        ctx.conn.close(
            super::reply_faults::DROPPED_REPLY_CLOSE_CODE.0.into(),
            b"test fault: reply dropped after the commit",
        );
        return;
    }
    let frame = match encode_frame(&reply) {
        Ok(frame) => frame,
        Err(e) => encode_frame(&Reply::Error(ErrorReply::new(
            ErrorCode::INTERNAL,
            format!("reply could not be encoded: {e}"),
        )))
        .expect("a small error reply always encodes"),
    };
    if send.write_all(&frame).await.is_ok() {
        let _ = send.finish();
        // Wait (briefly) until the peer has the reply, so shutdown cannot cut it off.
        let _ = tokio::time::timeout(REPLY_DELIVERY_WAIT, send.stopped()).await;
    }
}

enum ReadFailed {
    /// Nobody to answer: the stream was aborted, or the connection closed
    /// for bad framing.
    Gone,
    TimedOut,
    /// The frame could never be reserved in request memory.
    TooLarge(FrameTooLarge),
}

/// What a request holds while it is read and answered: its bytes in the
/// connection's in-flight budget, its principal's share and the broker's
/// request memory. Dropping it releases all three.
struct Held<'a> {
    _in_flight: tokio::sync::SemaphorePermit<'a>,
    _memory: super::memory::Reservation,
}

/// Read one request frame, holding its bytes against the connection's
/// in-flight budget and request memory until the caller drops them. The
/// header must come within `request_read_timeout` of the stream opening, and
/// the body within as long again once the budgets let the broker read it.
async fn read_frame<'a>(
    state: &ServerState,
    ctx: &'a ConnectionContext,
    recv: &mut quinn::RecvStream,
) -> Result<(Vec<u8>, Held<'a>), ReadFailed> {
    let timeout = state.config.request_read_timeout;
    let mut header = [0u8; FRAME_HEADER_BYTES];
    match tokio::time::timeout(timeout, recv.read_exact(&mut header)).await {
        Err(_) => return Err(ReadFailed::TimedOut),
        Ok(Ok(())) => {}
        Ok(Err(quinn::ReadExactError::FinishedEarly(n))) => {
            close_for_framing(
                ctx,
                ErrorCode::BAD_REQUEST,
                format!("truncated frame: stream ended after {n} header bytes"),
            );
            return Err(ReadFailed::Gone);
        }
        // The client reset the stream or went away mid-request: nothing to answer.
        Ok(Err(quinn::ReadExactError::ReadError(e))) => {
            tracing::debug!(conn = ctx.id, error = %e, "request stream aborted");
            return Err(ReadFailed::Gone);
        }
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > FRAME_BYTES_MAX {
        close_for_framing(
            ctx,
            ErrorCode::FRAME_TOO_LARGE,
            format!("frame of {len} bytes exceeds the {FRAME_BYTES_MAX} byte limit"),
        );
        return Err(ReadFailed::Gone);
    }
    // Held to the unauthenticated limit: a connection that has not yet
    // authenticated to a broker that requires it.
    let authenticated =
        !state.config.auth || ctx.principal.lock().expect("principal lock").is_some();
    state
        .request_memory
        .check_fits(len as u64, authenticated)
        .map_err(ReadFailed::TooLarge)?;
    // Bytes read but not yet answered are bounded per connection; a frame
    // larger than the whole budget waits until it is the only one, and so
    // does every frame of an unauthenticated connection.
    let budget = state.config.in_flight_bytes_per_connection_max.as_u64() as usize;
    let counted = if authenticated {
        len.clamp(1, budget)
    } else {
        budget
    };
    let share = authenticated.then(|| {
        ctx.shared
            .lock()
            .expect("principal limits lock")
            .memory
            .clone()
    });
    // The waits end with the connection: a dead peer holds no place in line.
    let reserved = async {
        let in_flight = ctx
            .in_flight_bytes
            .acquire_many(counted as u32)
            .await
            .ok()?;
        let memory = state
            .request_memory
            .reserve(share.as_ref(), len as u32)
            .await;
        Some((in_flight, memory))
    };
    let (in_flight, memory) = tokio::select! {
        reserved = reserved => reserved.ok_or(ReadFailed::Gone)?,
        _ = ctx.conn.closed() => return Err(ReadFailed::Gone),
    };
    // The header was read before the reservation: its bytes are granted too.
    ctx.grant_receive_credit(FRAME_HEADER_BYTES + len);
    let held = Held {
        _in_flight: in_flight,
        _memory: memory,
    };
    let mut body = vec![0u8; len];
    let deadline = tokio::time::Instant::now() + timeout;
    let mut filled = 0;
    while filled < len {
        let failed = match tokio::time::timeout_at(deadline, recv.read(&mut body[filled..])).await {
            Ok(Ok(Some(n))) => {
                filled += n;
                continue;
            }
            Ok(Ok(None)) => {
                close_for_framing(
                    ctx,
                    ErrorCode::BAD_REQUEST,
                    format!(
                        "truncated frame: header says {len} body bytes, stream carried {filled}"
                    ),
                );
                return Err(ReadFailed::Gone);
            }
            Ok(Err(e)) => {
                tracing::debug!(conn = ctx.id, error = %e, "request stream aborted");
                ReadFailed::Gone
            }
            Err(_) => ReadFailed::TimedOut,
        };
        ctx.abandoned((len - filled) as u64);
        return Err(failed);
    }
    // The frame must end the stream.
    match tokio::time::timeout(timeout, recv.read_chunk(1, true)).await {
        Err(_) => Err(ReadFailed::TimedOut),
        Ok(Ok(None)) => Ok((body, held)),
        Ok(Ok(Some(_))) => {
            close_for_framing(
                ctx,
                ErrorCode::BAD_REQUEST,
                format!("stream carried bytes after the {len}-byte frame body"),
            );
            Err(ReadFailed::Gone)
        }
        Ok(Err(e)) => {
            tracing::debug!(conn = ctx.id, error = %e, "request stream aborted");
            Err(ReadFailed::Gone)
        }
    }
}

/// The reply to one request frame.
async fn answer(state: &Arc<ServerState>, ctx: &ConnectionContext, body: &[u8]) -> Reply {
    match decode_body::<Request>(body) {
        Ok(request) => match handlers::handle(state, ctx, request).await {
            Ok(reply) => reply,
            Err(err) => Reply::Error(err),
        },
        Err(e) => Reply::Error(ErrorReply::new(
            ErrorCode::BAD_REQUEST,
            format!("request could not be decoded: {e}"),
        )),
    }
}
