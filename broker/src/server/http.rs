//! The broker's HTTP port (default `127.0.0.1:7172`): Prometheus metrics at
//! `/metrics` and the web console at `/` (see [`super::console`]).
//!
//! Owns: the HTTP listener. It never blocks the QUIC side: a scrape reads
//! atomics and in-memory maps, and console actions run the same handlers
//! QUIC requests do.

use super::ServerState;
use crate::metrics::ScrapeFigures;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use std::sync::Arc;

/// Bind the HTTP listener; the returned task serves it.
pub(super) async fn bind(
    state: Arc<ServerState>,
    addr: std::net::SocketAddr,
) -> anyhow::Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!(
            "binding the HTTP port {addr}: {e} (set --http to another address, or --http off)"
        )
    })?;
    let local = listener.local_addr()?;
    use super::console;
    let component_bytes_max = state.config.plugin_component_bytes_max.as_u64() as usize;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/", get(console::page))
        .route("/api/overview", get(console::overview))
        .route("/api/plugins/{name}/pause", post(console::pause))
        .route("/api/plugins/{name}/resume", post(console::resume))
        .route(
            "/api/plugins/{name}/deploy",
            post(console::deploy).layer(axum::extract::DefaultBodyLimit::max(component_bytes_max)),
        )
        .with_state(state);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });
    Ok((local, task))
}

async fn metrics(State(state): State<Arc<ServerState>>) -> impl IntoResponse {
    let body =
        tokio::task::spawn_blocking(move || crate::metrics::global().render(&figures(&state)))
            .await
            .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
}

/// What `/metrics` shows that is kept outside the registry: read from the
/// core and the wire at scrape time.
fn figures(state: &ServerState) -> ScrapeFigures {
    let memory = &state.request_memory;
    let mut f = ScrapeFigures {
        connections_open: state.connections.total(),
        request_memory_reserved: memory.reserved_bytes(),
        request_memory_budget: memory.budget_bytes(),
        request_memory_waiting: memory.waiting_streams(),
        disk_free_bytes: state.disk.free_bytes(),
        disk_low: state.disk.is_low(),
        transactions_pending: state.store.schedule().lock().map_or(0, |s| s.len()) as u64,
        ..ScrapeFigures::default()
    };
    for topic in state.registry.list() {
        for p in 0..topic.partition_count() {
            f.backlog
                .push((topic.name.clone(), p, state.registry.backlog(&topic, p)));
            let end = topic.partition(p).map_or(0, |o| o.end());
            for (group, offset) in state.registry.committed_groups(topic.id(), p) {
                f.lag
                    .push((group, topic.name.clone(), p, end.saturating_sub(offset)));
            }
        }
    }
    for name in state.plugins.names() {
        if let Ok(s) = state.plugins.stats(&state.core, &name) {
            f.plugins.push((name, s));
        }
    }
    f
}
