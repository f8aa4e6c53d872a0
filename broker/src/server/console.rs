//! The web console on the HTTP port: one static page (`console.html`) and the
//! JSON it polls.
//!
//! Owns: `/`, `/api/overview` and the plugin actions under `/api/plugins/`.
//! Invariants: every action goes through the same authorisation gate as the
//! QUIC request it stands for; with authentication on, every `/api` call
//! needs `Authorization: Bearer <token>`. The overview reads in-memory state
//! plus one bounded read of pending transactions.

use super::ServerState;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use msmq_protocol::{ErrorCode, ErrorReply, PluginSpec, Reply, Request};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Most pending transactions the overview lists.
const OVERVIEW_TRANSACTIONS_MAX: u32 = 50;

const PAGE: &str = include_str!("console.html");

pub(super) async fn page() -> Html<&'static str> {
    Html(PAGE)
}

#[derive(Serialize)]
struct Overview {
    now_ms: u64,
    /// Broker-wide counters since start; the page charts their rates.
    produced_messages: u64,
    /// Handed to consumers plus processed by plugins.
    consumed_messages: u64,
    topics: Vec<TopicRow>,
    groups: Vec<GroupRow>,
    /// `None` when the caller may not list transactions.
    transactions_pending: Option<usize>,
    transactions: Vec<msmq_protocol::TransactionInfo>,
    dead_letters: Vec<TopicRow>,
    plugins: Vec<PluginRow>,
    health: Health,
}

/// What holds the broker back: its disk and its request memory.
#[derive(Serialize)]
struct Health {
    disk_free_bytes: u64,
    /// `disk_free_min`: below it produces are refused (`DISK_FULL`).
    disk_free_min_bytes: u64,
    disk_low: bool,
    /// Storage commits that failed since start.
    storage_errors: u64,
    /// The database is being reopened after an I/O error: writes refused.
    storage_recovering: bool,
    request_memory_reserved_bytes: u64,
    request_memory_budget_bytes: u64,
    request_memory_waiting_streams: u64,
}

#[derive(Serialize)]
struct TopicRow {
    name: String,
    partitions: u32,
    /// Messages stored (end − start over partitions).
    messages: u64,
    /// Messages the slowest group has not consumed.
    backlog: u64,
    end_offset_sum: u64,
}

#[derive(Serialize, Default)]
struct GroupRow {
    name: String,
    members: u32,
    topics: Vec<String>,
    lag: u64,
}

#[derive(Serialize)]
struct PluginRow {
    name: String,
    topic: String,
    version: u32,
    status: String,
    processed: u64,
    failed_batches: u64,
    dead_lettered: u64,
    lag: u64,
    throttled_ms: u64,
    memory_bytes: u64,
}

/// An error as JSON with the HTTP status that fits its code.
fn error(err: ErrorReply) -> Response {
    let status = match err.code {
        ErrorCode::UNAUTHENTICATED => StatusCode::UNAUTHORIZED,
        ErrorCode::FORBIDDEN => StatusCode::FORBIDDEN,
        ErrorCode::UNKNOWN_PLUGIN | ErrorCode::UNKNOWN_TOPIC => StatusCode::NOT_FOUND,
        ErrorCode::BAD_REQUEST | ErrorCode::INVALID_ARGUMENT | ErrorCode::PLUGIN_REFUSED => {
            StatusCode::BAD_REQUEST
        }
        ErrorCode::SHUTTING_DOWN | ErrorCode::BUSY | ErrorCode::STORAGE_ERROR => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let body = serde_json::json!({"code": err.code.name(), "message": err.message});
    (status, Json(body)).into_response()
}

/// Header every console action must carry. A page of another origin cannot
/// send it without a CORS preflight, which this server never grants, so a
/// web page the operator happens to visit cannot act on the broker.
pub const ACTION_HEADER: &str = "x-msmq-console";

/// The caller's (token id, principal) from its bearer token; with
/// authentication on, a missing or unknown token is refused here. On a
/// loopback listener the `Host` must be a loopback name too, so a DNS name
/// rebound to 127.0.0.1 by some web page cannot read or act.
fn caller(
    state: &ServerState,
    headers: &HeaderMap,
) -> Result<Option<(String, String)>, ErrorReply> {
    if !host_allowed(state, headers) {
        return Err(ErrorReply::new(
            ErrorCode::FORBIDDEN,
            "the console on a loopback address answers only Host 127.0.0.1, [::1] or localhost",
        ));
    }
    if !state.config.auth {
        return Ok(None);
    }
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match token.and_then(|t| state.tokens.verify(t)) {
        Some(found) => Ok(Some(found)),
        None => Err(ErrorReply::new(
            ErrorCode::UNAUTHENTICATED,
            "authentication is on: give a token (msmq token create)",
        )),
    }
}

fn host_allowed(state: &ServerState, headers: &HeaderMap) -> bool {
    let loopback = state
        .config
        .http_addr()
        .ok()
        .flatten()
        .is_some_and(|a| a.ip().is_loopback());
    if !loopback {
        return true;
    }
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    matches!(name, "localhost" | "[::1]")
        || name
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

pub(super) async fn overview(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
) -> Response {
    match build_overview(&state, &headers).await {
        Ok(overview) => Json(overview).into_response(),
        Err(e) => error(e),
    }
}

async fn build_overview(
    state: &Arc<ServerState>,
    headers: &HeaderMap,
) -> Result<Overview, ErrorReply> {
    let principal = caller(state, headers)?;
    let (transactions, transactions_visible) = match super::handlers::handle_http(
        state,
        principal,
        Request::ListTransactions {
            discarded: false,
            limit: OVERVIEW_TRANSACTIONS_MAX,
        },
    )
    .await
    {
        Ok(Reply::Transactions(list)) => (list, true),
        Ok(_) => (vec![], true),
        // Not the caller's to see.
        Err(e) if e.code == ErrorCode::FORBIDDEN => (vec![], false),
        Err(e) => return Err(e),
    };
    let mut topics = Vec::new();
    let mut dead_letters = Vec::new();
    let mut groups: BTreeMap<String, GroupRow> = BTreeMap::new();
    for topic in state.registry.list() {
        let mut row = TopicRow {
            name: topic.name.clone(),
            partitions: topic.partition_count(),
            messages: 0,
            backlog: 0,
            end_offset_sum: 0,
        };
        for p in 0..topic.partition_count() {
            let Some(offsets) = topic.partition(p) else {
                continue;
            };
            let end = offsets.end();
            row.messages += end.saturating_sub(offsets.start());
            row.end_offset_sum += end;
            row.backlog += state.registry.backlog(&topic, p);
            for (group, committed) in state.registry.committed_groups(topic.id(), p) {
                let g = groups.entry(group.clone()).or_default();
                g.name = group;
                g.lag += end.saturating_sub(committed);
                if !g.topics.contains(&topic.name) {
                    g.topics.push(topic.name.clone());
                }
            }
        }
        if topic.name.starts_with(crate::core::ack::DLQ_PREFIX) {
            dead_letters.push(row);
        } else {
            topics.push(row);
        }
    }
    state.with_groups(|coordinator, _| {
        for (name, group) in coordinator.groups() {
            let g = groups.entry(name.clone()).or_default();
            g.name = name.clone();
            g.members = group.members.len() as u32;
        }
    });
    let plugins: Vec<PluginRow> = state
        .plugins
        .list()
        .into_iter()
        .map(|info| {
            let stats = state
                .plugins
                .stats(state, &info.spec.name)
                .unwrap_or_default();
            PluginRow {
                name: info.spec.name,
                topic: info.spec.topic,
                version: info.version,
                status: info.status,
                processed: stats.processed,
                failed_batches: stats.failed_batches,
                dead_lettered: stats.dead_lettered,
                lag: stats.lag,
                throttled_ms: stats.throttled_ms,
                memory_bytes: stats.memory_bytes,
            }
        })
        .collect();
    let metrics = crate::metrics::global();
    Ok(Overview {
        now_ms: state.now_ms(),
        produced_messages: metrics.produced_messages.get(),
        consumed_messages: metrics.consumed_messages.get()
            + plugins.iter().map(|p| p.processed).sum::<u64>(),
        topics,
        groups: groups.into_values().collect(),
        transactions_pending: transactions_visible
            .then(|| state.store.schedule().lock().map_or(0, |s| s.len())),
        transactions,
        dead_letters,
        plugins,
        health: Health {
            disk_free_bytes: state.disk.free_bytes(),
            disk_free_min_bytes: state.config.disk_free_min.as_u64(),
            disk_low: state.disk.is_low(),
            storage_errors: metrics.storage_errors.get(),
            storage_recovering: metrics.storage_recovering.get() != 0,
            request_memory_reserved_bytes: state.request_memory.reserved_bytes(),
            request_memory_budget_bytes: state.request_memory.budget_bytes(),
            request_memory_waiting_streams: state.request_memory.waiting_streams(),
        },
    })
}

async fn act(state: &Arc<ServerState>, headers: &HeaderMap, request: Request) -> Response {
    if !headers.contains_key(ACTION_HEADER) {
        return error(ErrorReply::new(
            ErrorCode::FORBIDDEN,
            format!("console actions need the {ACTION_HEADER} header"),
        ));
    }
    let result = match caller(state, headers) {
        Ok(principal) => super::handlers::handle_http(state, principal, request).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(_) => Json(serde_json::json!({"ok": true})).into_response(),
        Err(e) => error(e),
    }
}

pub(super) async fn pause(
    State(state): State<Arc<ServerState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    act(&state, &headers, Request::PausePlugin { name }).await
}

pub(super) async fn resume(
    State(state): State<Arc<ServerState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    act(&state, &headers, Request::ResumePlugin { name }).await
}

#[derive(Deserialize)]
pub(super) struct DeployQuery {
    topic: String,
    /// Comma-separated topics the plugin may publish to.
    #[serde(default)]
    publish_to: String,
}

/// `POST /api/plugins/{name}/deploy?topic=T` with the component as the body.
pub(super) async fn deploy(
    State(state): State<Arc<ServerState>>,
    Path(name): Path<String>,
    Query(query): Query<DeployQuery>,
    headers: HeaderMap,
    component: Bytes,
) -> Response {
    let mut spec = PluginSpec::new(name, query.topic);
    spec.publish_to = query
        .publish_to
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect();
    let request = Request::DeployPlugin {
        spec,
        component: component.to_vec(),
    };
    act(&state, &headers, request).await
}
