//! Tokens and ACLs: create, revoke and list tokens; set and read a
//! principal's rules. The gate that checks them is the wire's.

use crate::auth::{generate, validate_principal};
use crate::command::Command;
use crate::core::{from_write, invalid, BrokerState};
use crate::storage::WriteOutcome;
use msmq_protocol::{AclRule, ErrorReply, Reply, TokenInfo};

pub(crate) async fn set_acl(
    state: &BrokerState,
    principal: String,
    rules: Vec<AclRule>,
) -> Result<Reply, ErrorReply> {
    validate_principal(&principal).map_err(invalid)?;
    for rule in &rules {
        if rule.pattern.is_empty() || rule.actions.is_empty() {
            return Err(invalid(
                "every ACL rule needs a pattern and at least one action",
            ));
        }
    }
    state
        .submit(Command::SetAcl {
            principal: principal.clone(),
            rules: rules.clone(),
        })
        .await
        .map_err(from_write)?;
    tracing::info!(%principal, rules = rules.len(), "ACL set");
    state.acls.set(&principal, rules);
    Ok(Reply::Done)
}

pub(crate) fn get_acl(state: &BrokerState, principal: &str) -> Reply {
    Reply::Acl(state.acls.rules(principal))
}

pub(crate) async fn create_token(
    state: &BrokerState,
    principal: String,
) -> Result<Reply, ErrorReply> {
    validate_principal(&principal).map_err(invalid)?;
    let (token_id, record, token) = generate(&principal, state.now_ms());
    state
        .submit(Command::PutToken {
            id: token_id.clone(),
            record: Some(record.clone()),
        })
        .await
        .map_err(from_write)?;
    state.tokens.insert(token_id.clone(), record);
    tracing::info!(%principal, %token_id, "token created");
    Ok(Reply::TokenCreated { token_id, token })
}

pub(crate) async fn revoke_token(
    state: &BrokerState,
    token_id: String,
) -> Result<Reply, ErrorReply> {
    let outcome = state
        .submit(Command::PutToken {
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

pub(crate) fn list_tokens(state: &BrokerState) -> Reply {
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
