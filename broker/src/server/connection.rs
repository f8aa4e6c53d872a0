//! Accepting connections and reading one request frame per stream.
//!
//! A framing error (truncated frame, oversize header, bytes after the body)
//! closes the whole connection with the error code and a reason: the peer's
//! framing can no longer be trusted. A body that frames correctly but does
//! not decode gets a `BAD_REQUEST` reply on its stream.

use super::{handlers, BrokerState};
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
    state: Arc<BrokerState>,
    endpoint: quinn::Endpoint,
    requests: TaskTracker,
) {
    while let Some(incoming) = endpoint.accept().await {
        if state.is_shutting_down() {
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

async fn serve_connection(state: Arc<BrokerState>, conn: quinn::Connection, requests: TaskTracker) {
    let ctx = Arc::new(ConnectionContext {
        id: state.next_connection_id.fetch_add(1, Ordering::Relaxed),
        remote: conn.remote_address(),
        conn: conn.clone(),
        principal: std::sync::Mutex::new(certificate_principal(&conn)),
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
                let (state, ctx, conn) = (state.clone(), ctx.clone(), conn.clone());
                requests.spawn(async move { serve_stream(&state, &ctx, &conn, send, recv).await });
            }
            Err(e) => break e,
        }
    };
    state.producers.remove_connection(ctx.id);
    let dropped = state.with_groups(|g, partitions_of| g.drop_connection(ctx.id, partitions_of));
    for (group, member) in dropped {
        tracing::info!(%group, member, "member's connection closed; partitions rebalanced");
    }
    tracing::debug!(conn = ctx.id, remote = %ctx.remote, %reason, "connection closed");
}

fn close_for_framing(conn: &quinn::Connection, code: ErrorCode, reason: String) {
    tracing::warn!(remote = %conn.remote_address(), %code, %reason, "closing connection: bad framing");
    let reason: String = reason.chars().take(200).collect();
    conn.close(code.0.into(), reason.as_bytes());
}

async fn serve_stream(
    state: &Arc<BrokerState>,
    ctx: &ConnectionContext,
    conn: &quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(n)) => {
            return close_for_framing(
                conn,
                ErrorCode::BAD_REQUEST,
                format!("truncated frame: stream ended after {n} header bytes"),
            );
        }
        // The client reset the stream or went away mid-request: nothing to answer.
        Err(quinn::ReadExactError::ReadError(e)) => {
            return tracing::debug!(conn = ctx.id, error = %e, "request stream aborted");
        }
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > FRAME_BYTES_MAX {
        return close_for_framing(
            conn,
            ErrorCode::FRAME_TOO_LARGE,
            format!("frame of {len} bytes exceeds the {FRAME_BYTES_MAX} byte limit"),
        );
    }
    let body = match recv.read_to_end(len).await {
        Ok(body) if body.len() == len => body,
        Ok(body) => {
            return close_for_framing(
                conn,
                ErrorCode::BAD_REQUEST,
                format!(
                    "truncated frame: header says {len} body bytes, stream carried {}",
                    body.len()
                ),
            );
        }
        Err(quinn::ReadToEndError::TooLong) => {
            return close_for_framing(
                conn,
                ErrorCode::BAD_REQUEST,
                format!("stream carried bytes after the {len}-byte frame body"),
            );
        }
        Err(quinn::ReadToEndError::Read(e)) => {
            return tracing::debug!(conn = ctx.id, error = %e, "request stream aborted");
        }
    };
    let reply = match decode_body::<Request>(&body) {
        Ok(request) => match handlers::handle(state, ctx, request).await {
            Ok(reply) => reply,
            Err(err) => Reply::Error(err),
        },
        Err(e) => Reply::Error(ErrorReply::new(
            ErrorCode::BAD_REQUEST,
            format!("request could not be decoded: {e}"),
        )),
    };
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
