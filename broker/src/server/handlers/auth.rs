//! Authentication requests and the gate every request passes.

use super::{from_write, invalid};
use crate::auth::{generate, validate_principal, ADMIN_PRINCIPAL};
use crate::server::connection::ConnectionContext;
use crate::server::BrokerState;
use crate::storage::{WriteOp, WriteOutcome};
use msmq_protocol::{ErrorCode, ErrorReply, Reply, Request, TokenInfo};

fn unauthenticated(message: impl Into<String>) -> ErrorReply {
    ErrorReply::new(ErrorCode::UNAUTHENTICATED, message)
}

/// With authentication on, every request but `Ping` and `Authenticate`
/// needs a connection whose token is still valid; token administration
/// needs the admin principal.
pub(super) fn gate(
    state: &BrokerState,
    ctx: &ConnectionContext,
    request: &Request,
) -> Result<(), ErrorReply> {
    if !state.config.auth || matches!(request, Request::Ping | Request::Authenticate { .. }) {
        return Ok(());
    }
    let principal = ctx.principal.lock().expect("principal lock").clone();
    let Some((token_id, principal)) = principal else {
        return Err(unauthenticated(
            "authentication is on: present a token first (msmq --token, MSMQ_TOKEN)",
        ));
    };
    if !state.tokens.contains(&token_id) {
        return Err(unauthenticated(format!(
            "the token {token_id} of {principal:?} was revoked"
        )));
    }
    let admin_only = matches!(
        request,
        Request::CreateToken { .. } | Request::RevokeToken { .. } | Request::ListTokens
    );
    if admin_only && principal != ADMIN_PRINCIPAL {
        return Err(ErrorReply::new(
            ErrorCode::FORBIDDEN,
            format!("{principal:?} may not manage tokens; only {ADMIN_PRINCIPAL:?} may"),
        ));
    }
    Ok(())
}

pub(super) fn authenticate(
    state: &BrokerState,
    ctx: &ConnectionContext,
    token: &str,
) -> Result<Reply, ErrorReply> {
    if !state.config.auth {
        return Ok(Reply::Authenticated {
            principal: "anonymous".into(),
        });
    }
    match state.tokens.verify(token) {
        Some((id, principal)) => {
            tracing::debug!(conn = ctx.id, %principal, "connection authenticated");
            *ctx.principal.lock().expect("principal lock") = Some((id, principal.clone()));
            Ok(Reply::Authenticated { principal })
        }
        None => {
            tracing::warn!(conn = ctx.id, remote = %ctx.remote, "authentication failed");
            Err(unauthenticated("unknown or revoked token"))
        }
    }
}

pub(super) async fn create_token(
    state: &BrokerState,
    principal: String,
) -> Result<Reply, ErrorReply> {
    validate_principal(&principal).map_err(invalid)?;
    let (token_id, record, token) = generate(&principal, super::now_ms());
    state
        .store
        .write(WriteOp::PutToken {
            id: token_id.clone(),
            record: Some(record.clone()),
        })
        .await
        .map_err(from_write)?;
    state.tokens.insert(token_id.clone(), record);
    tracing::info!(%principal, %token_id, "token created");
    Ok(Reply::TokenCreated { token_id, token })
}

pub(super) async fn revoke_token(
    state: &BrokerState,
    token_id: String,
) -> Result<Reply, ErrorReply> {
    let outcome = state
        .store
        .write(WriteOp::PutToken {
            id: token_id.clone(),
            record: None,
        })
        .await
        .map_err(from_write)?;
    state.tokens.remove(&token_id);
    match outcome {
        WriteOutcome::TokenStored(true) => {
            tracing::info!(%token_id, "token revoked");
            Ok(Reply::Done)
        }
        _ => Err(invalid(format!("no token with id {token_id:?}"))),
    }
}

pub(super) fn list_tokens(state: &BrokerState) -> Reply {
    Reply::Tokens(
        state
            .tokens
            .list()
            .into_iter()
            .map(|(token_id, r)| TokenInfo {
                token_id,
                principal: r.principal,
                created_at_ms: r.created_at_ms,
            })
            .collect(),
    )
}
