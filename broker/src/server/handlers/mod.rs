//! The wire's side of every request: the authentication gate, then the
//! call into the core's operation (`crate::core::ops`, `crate::core::ack`)
//! with the request's fields, and the reply or an [`ErrorReply`] with a
//! stable code; none panics on client input. What needs the connection
//! itself (authenticating it, registering it as a producer) stays here.

mod auth;

use super::connection::ConnectionContext;
use super::ServerState;
use crate::core::ack;
use crate::core::ops::{access, admin, fetch as read, group, plugin, produce, tx};
use msmq_protocol::{ErrorCode, ErrorReply, Reply, Request, SequencedRequest};

pub(super) async fn handle(
    state: &std::sync::Arc<ServerState>,
    ctx: &ConnectionContext,
    request: Request,
) -> Result<Reply, ErrorReply> {
    let started = std::time::Instant::now();
    let produced_bytes = match &request {
        Request::Produce { messages, .. }
        | Request::Sequenced {
            request: SequencedRequest::Produce { messages, .. },
            ..
        } => Some(messages.iter().map(|m| m.size_bytes() as u64).sum()),
        _ => None,
    };
    auth::gate(state, ctx, &request)?;
    let result = dispatch(state, ctx, request).await;
    if let Ok(reply) = &result {
        crate::metrics::observe_reply(reply, produced_bytes, started);
    }
    result
}

/// The requests the HTTP console may make, for a caller authenticated by
/// bearer token (`principal`), behind the same gate as QUIC requests.
pub(crate) async fn handle_http(
    state: &std::sync::Arc<ServerState>,
    principal: Option<(String, String)>,
    request: Request,
) -> Result<Reply, ErrorReply> {
    auth::gate_principal(state, principal, &request)?;
    if state.is_shutting_down() {
        return Err(ErrorReply::new(
            ErrorCode::SHUTTING_DOWN,
            "the broker is shutting down; nothing was applied",
        ));
    }
    match request {
        Request::ListTransactions { discarded, limit } => {
            tx::list_transactions(state, discarded, limit).await
        }
        Request::DeployPlugin { spec, component } => {
            plugin::deploy(&state.core, spec, component).await
        }
        Request::PausePlugin { name } => plugin::set_paused(&state.core, &name, true).await,
        Request::ResumePlugin { name } => plugin::set_paused(&state.core, &name, false).await,
        _ => Err(ErrorReply::new(
            ErrorCode::BAD_REQUEST,
            "this request is not available over HTTP",
        )),
    }
}

async fn dispatch(
    state: &std::sync::Arc<ServerState>,
    ctx: &ConnectionContext,
    request: Request,
) -> Result<Reply, ErrorReply> {
    if state.is_shutting_down() {
        return Err(ErrorReply::new(
            ErrorCode::SHUTTING_DOWN,
            "the broker is shutting down; nothing was applied",
        ));
    }
    match request {
        Request::Ping => Ok(admin::ping()),
        Request::Authenticate { token } => auth::authenticate(state, ctx, &token),
        Request::CreateToken { principal } => access::create_token(state, principal).await,
        Request::RevokeToken { token_id } => access::revoke_token(state, token_id).await,
        Request::ListTokens => Ok(access::list_tokens(state)),
        Request::SetAcl { principal, rules } => access::set_acl(state, principal, rules).await,
        Request::GetAcl { principal } => Ok(access::get_acl(state, &principal)),
        Request::DeployPlugin { spec, component } => {
            plugin::deploy(&state.core, spec, component).await
        }
        Request::ListPlugins => Ok(Reply::Plugins(state.plugins.list())),
        Request::PluginStats { name } => plugin::stats(state, &name),
        Request::PausePlugin { name } => plugin::set_paused(&state.core, &name, true).await,
        Request::ResumePlugin { name } => plugin::set_paused(&state.core, &name, false).await,
        Request::RemovePlugin { name } => plugin::remove(&state.core, &name).await,
        Request::PluginState {
            name,
            prefix,
            start_after,
            limit,
        } => {
            plugin::state(
                state,
                name,
                prefix,
                start_after.map(|b| b.into_vec()),
                limit,
            )
            .await
        }
        Request::CreateTopic { name, partitions } => {
            admin::create_topic(state, name, partitions).await
        }
        Request::DeleteTopic { name } => admin::delete_topic(state, name).await,
        Request::ListTopics => Ok(admin::list_topics(state)),
        Request::SetTopicRetention { topic, retention } => {
            admin::set_retention(state, topic, retention).await
        }
        Request::GetTopicRetention { topic } => admin::get_retention(state, topic).await,
        Request::DescribeTopic { name } => admin::describe_topic(state, name).await,
        Request::ListGroups => admin::list_groups(state).await,
        Request::DescribeGroup { group } => admin::describe_group(state, group).await,
        Request::Produce {
            topic,
            partition,
            messages,
        } => produce::produce(state, topic, partition, messages, None).await,
        Request::Fetch {
            topic,
            partition,
            offset,
            limits,
        } => read::fetch(state, topic, partition, offset, limits).await,
        Request::JoinGroup {
            group,
            topics,
            start,
            session_timeout_ms,
            broadcast_instance,
            tag_filter,
            sql_filter,
        } => {
            let client = group::Client {
                connection_id: ctx.id,
                remote: ctx.remote,
            };
            group::join(
                state,
                &client,
                group,
                topics,
                start,
                session_timeout_ms,
                broadcast_instance,
                tag_filter,
                sql_filter,
            )
            .await
        }
        Request::Heartbeat { group, member_id } => group::heartbeat(state, group, member_id),
        Request::Poll {
            group,
            member_id,
            limits,
            positions,
        } => group::poll(state, group, member_id, limits, positions).await,
        Request::CommitOffsets {
            group,
            member_id,
            generation: _,
            offsets,
        } => group::commit(state, group, member_id, offsets).await,
        Request::LeaveGroup { group, member_id } => group::leave(state, group, member_id),
        Request::RegisterProducer { producer_group } => {
            register_producer(state, ctx, producer_group)
        }
        Request::InitProducer { producer_id } => {
            produce::init_producer(state, principal_of(ctx), producer_id).await
        }
        Request::Sequenced { producer, request } => {
            sequenced(state, request, (producer, principal_of(ctx))).await
        }
        Request::SendHalf {
            producer_group,
            topic,
            partition,
            messages,
            check_immunity_ms,
        } => {
            tx::send_half(
                state,
                producer_group,
                topic,
                partition,
                messages,
                check_immunity_ms,
                None,
            )
            .await
        }
        Request::EndTransaction {
            producer_group,
            tx_id,
            action,
        } => tx::end_transaction(state, producer_group, tx_id, action).await,
        Request::ListTransactions { discarded, limit } => {
            tx::list_transactions(state, discarded, limit).await
        }
        Request::ResolveDiscarded { tx_id, action } => {
            let reply = tx::resolve_discarded(state, tx_id, action).await;
            // A resumed transaction is checked back at once.
            state.producers.registered.notify_one();
            reply
        }
        Request::EndTransactions {
            producer_group,
            decisions,
        } => tx::end_transactions(state, producer_group, decisions).await,
        Request::ResetGroupOffsets { group, topic, to } => {
            group::reset_offsets(state, group, topic, to).await
        }
        Request::Receive {
            group,
            member_id,
            limits,
            invisibility_ms,
        } => ack::receive(state, group, member_id, limits, invisibility_ms).await,
        Request::Ack { group, receipts } => ack::ack(state, group, receipts).await,
        Request::Nack {
            group,
            receipts,
            reason,
        } => ack::nack(state, group, receipts, reason).await,
        Request::ChangeInvisibility {
            group,
            receipt,
            invisibility_ms,
        } => ack::change_invisibility(state, group, receipt, invisibility_ms).await,
        Request::GetMessage { id } => read::get_message(state, id).await,
        Request::FindMessages { topic, key, limit } => {
            read::find_messages(state, topic, key, limit).await
        }
        Request::ConfigureGroup {
            group,
            max_delivery_attempts,
            retry_backoff_ms,
            ordered,
        } => {
            ack::configure(
                state,
                group,
                max_delivery_attempts,
                retry_backoff_ms,
                ordered,
            )
            .await
        }
    }
}

/// A `Produce` or `SendHalf` numbered by an idempotent producer.
async fn sequenced(
    state: &std::sync::Arc<ServerState>,
    request: SequencedRequest,
    producer: (msmq_protocol::ProducerSequence, String),
) -> Result<Reply, ErrorReply> {
    let sequenced = Some(producer);
    match request {
        SequencedRequest::Produce {
            topic,
            partition,
            messages,
        } => produce::produce(state, topic, partition, messages, sequenced).await,
        SequencedRequest::SendHalf {
            producer_group,
            topic,
            partition,
            messages,
            check_immunity_ms,
        } => {
            tx::send_half(
                state,
                producer_group,
                topic,
                partition,
                messages,
                check_immunity_ms,
                sequenced,
            )
            .await
        }
    }
}

/// The authenticated principal of a connection; "" when authentication is
/// off (every connection is then the same anonymous principal).
fn principal_of(ctx: &ConnectionContext) -> String {
    ctx.principal
        .lock()
        .expect("principal lock")
        .as_ref()
        .map(|(_, principal)| principal.clone())
        .unwrap_or_default()
}

/// A connection offers to answer check-backs for its producer group.
fn register_producer(
    state: &ServerState,
    ctx: &ConnectionContext,
    producer_group: String,
) -> Result<Reply, ErrorReply> {
    msmq_protocol::names::validate_name("producer group", &producer_group)
        .map_err(crate::core::invalid)?;
    state
        .store
        .schedule()
        .lock()
        .expect("schedule lock")
        .wake_group(&producer_group);
    state
        .producers
        .register(&producer_group, ctx.id, ctx.conn.clone());
    tracing::info!(group = %producer_group, remote = %ctx.remote,
        producers = state.producers.count(&producer_group), "transactional producer registered");
    Ok(Reply::Done)
}
