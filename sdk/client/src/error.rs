//! The client's error type.

use msmq_protocol::{ErrorCode, ErrorReply, FrameError};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ClientError {
    /// The broker answered with an error code.
    #[error("broker refused the request: {0}")]
    Broker(ErrorReply),
    #[error("invalid client options: {0}")]
    Options(String),
    #[error("could not connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("stream failed: {0}")]
    Stream(String),
    #[error("protocol error: {0}")]
    Protocol(#[from] FrameError),
    #[error("unexpected reply to {request}: {reply}")]
    UnexpectedReply {
        request: &'static str,
        reply: String,
    },
    #[error("request timed out after {0:?}")]
    Timeout(std::time::Duration),
}

impl ClientError {
    /// The broker's error code, if the broker answered with one or closed
    /// the connection with one (see [`ClientError::close_reason`]).
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Broker(reply) => Some(reply.code),
            ClientError::Connection(quinn::ConnectionError::ApplicationClosed(close)) => {
                u16::try_from(close.error_code.into_inner())
                    .ok()
                    .map(ErrorCode)
            }
            _ => None,
        }
    }

    /// Why the broker closed the connection, when it said.
    pub fn close_reason(&self) -> Option<String> {
        match self {
            ClientError::Connection(quinn::ConnectionError::ApplicationClosed(close)) => {
                Some(String::from_utf8_lossy(&close.reason).into_owned())
            }
            _ => None,
        }
    }

    /// Whether sending the same request again later may succeed. Note that a
    /// produce whose connection dropped mid-request may or may not have been
    /// stored: retrying it can duplicate.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Broker(reply) => reply.code.is_retryable(),
            ClientError::Connect { .. }
            | ClientError::Connection(_)
            | ClientError::Stream(_)
            | ClientError::Timeout(_) => true,
            _ => false,
        }
    }
}
