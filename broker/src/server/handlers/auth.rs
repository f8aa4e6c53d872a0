//! The gate every request passes, and `Authenticate`, which binds a
//! token's principal to the connection.

use crate::auth::{allows, ADMIN_PRINCIPAL};
use crate::server::connection::ConnectionContext;
use crate::server::ServerState;
use msmq_protocol::{
    AclAction, AclResource, ErrorCode, ErrorReply, Reply, Request, SequencedRequest,
};

fn unauthenticated(message: impl Into<String>) -> ErrorReply {
    ErrorReply::new(ErrorCode::UNAUTHENTICATED, message)
}

/// With authentication on, every request but `Ping` and `Authenticate`
/// needs a connection whose token is still valid; token administration
/// needs the admin principal.
pub(super) fn gate(
    state: &ServerState,
    ctx: &ConnectionContext,
    request: &Request,
) -> Result<(), ErrorReply> {
    let principal = ctx.principal.lock().expect("principal lock").clone();
    gate_principal(state, principal, request)
}

/// The gate for a caller known by (token id, principal), if any.
pub(super) fn gate_principal(
    state: &ServerState,
    principal: Option<(String, String)>,
    request: &Request,
) -> Result<(), ErrorReply> {
    if !state.config.auth || matches!(request, Request::Ping | Request::Authenticate { .. }) {
        return Ok(());
    }
    let Some((token_id, principal)) = principal else {
        return Err(unauthenticated(
            "authentication is on: present a token first (msmq --token, MSMQ_TOKEN)",
        ));
    };
    let by_certificate = token_id.starts_with(crate::auth::CERTIFICATE_ID_PREFIX);
    if !by_certificate && !state.tokens.contains(&token_id) {
        return Err(unauthenticated(format!(
            "the token {token_id} of {principal:?} was revoked"
        )));
    }
    if principal == ADMIN_PRINCIPAL {
        return Ok(());
    }
    let Some(needed) = required(request) else {
        return Err(ErrorReply::new(
            ErrorCode::FORBIDDEN,
            format!("{principal:?} may not do this; only {ADMIN_PRINCIPAL:?} may"),
        ));
    };
    let rules = state.acls.rules(&principal);
    for (resource, name, action) in needed {
        if !allows(&rules, resource, name, action) {
            return Err(ErrorReply::new(
                ErrorCode::FORBIDDEN,
                format!("{principal:?} may not {action:?} on {resource:?} {name:?} (msmq acl set)"),
            ));
        }
    }
    Ok(())
}

/// What a request needs of a principal other than admin: (resource, name,
/// action) rights; `None` for administration only the admin may do.
fn required(request: &Request) -> Option<Vec<(AclResource, &str, AclAction)>> {
    use AclAction::*;
    use AclResource::*;
    Some(match request {
        // Reading what exists is open to every authenticated principal.
        Request::Ping
        | Request::Authenticate { .. }
        | Request::ListTopics
        | Request::DescribeTopic { .. }
        | Request::GetTopicRetention { .. }
        | Request::ListGroups
        | Request::DescribeGroup { .. }
        | Request::ListPlugins
        | Request::PluginStats { .. }
        | Request::InitProducer { .. } => vec![],
        Request::Sequenced { request, .. } => match request {
            SequencedRequest::Produce { topic, .. } => vec![(Topic, topic.as_str(), Produce)],
            SequencedRequest::SendHalf {
                producer_group,
                topic,
                ..
            } => vec![
                (ProducerGroup, producer_group.as_str(), Transact),
                (Topic, topic.as_str(), Produce),
            ],
        },
        Request::Produce { topic, .. } => vec![(Topic, topic.as_str(), Produce)],
        Request::Fetch { topic, .. } | Request::FindMessages { topic, .. } => {
            vec![(Topic, topic.as_str(), Consume)]
        }
        Request::JoinGroup { group, topics, .. } => {
            let mut v = vec![(Group, group.as_str(), Consume)];
            v.extend(topics.iter().map(|t| (Topic, t.as_str(), Consume)));
            v
        }
        Request::Heartbeat { group, .. }
        | Request::Poll { group, .. }
        | Request::CommitOffsets { group, .. }
        | Request::LeaveGroup { group, .. }
        | Request::Receive { group, .. }
        | Request::Ack { group, .. }
        | Request::Nack { group, .. }
        | Request::ChangeInvisibility { group, .. } => vec![(Group, group.as_str(), Consume)],
        Request::RegisterProducer { producer_group }
        | Request::EndTransaction { producer_group, .. }
        | Request::EndTransactions { producer_group, .. } => {
            vec![(ProducerGroup, producer_group.as_str(), Transact)]
        }
        Request::SendHalf {
            producer_group,
            topic,
            ..
        } => vec![
            (ProducerGroup, producer_group.as_str(), Transact),
            (Topic, topic.as_str(), Produce),
        ],
        Request::DeployPlugin { spec, .. } => {
            let mut v = vec![
                (Plugin, spec.name.as_str(), Deploy),
                (Topic, spec.topic.as_str(), Consume),
            ];
            // A plugin may publish only where its deployer may produce.
            v.extend(spec.publish_to.iter().map(|t| (Topic, t.as_str(), Produce)));
            v
        }
        Request::PausePlugin { name }
        | Request::ResumePlugin { name }
        | Request::RemovePlugin { name }
        | Request::PluginState { name, .. } => vec![(Plugin, name.as_str(), Deploy)],
        // Topic and group administration, transactions of every group,
        // message lookup by id, tokens and ACLs: admin only.
        _ => return None,
    })
}

pub(super) fn authenticate(
    state: &ServerState,
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
            if let Some((reason, left_ms)) = super::super::connection::banned(state, &principal) {
                return Err(ErrorReply {
                    code: ErrorCode::RATE_LIMITED,
                    message: reason,
                    retry_after_ms: Some(left_ms),
                });
            }
            if let Err(open) = ctx.recount_as(state, &principal) {
                crate::metrics::global().client_limit("connections");
                return Err(ErrorReply::new(
                    ErrorCode::TOO_MANY_CONNECTIONS,
                    format!(
                        "{principal:?} already has {open} connections open, the limit \
                         (connections_per_principal_max) is {}",
                        state.config.connections_per_principal_max
                    ),
                ));
            }
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
