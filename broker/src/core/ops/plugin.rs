//! Plugin administration: deploy, list, stats, pause, resume, remove, and
//! reading a plugin's committed state.

use crate::core::plugins::{PluginError, PluginManager};
use crate::core::BrokerState;
use crate::core::{blocking, from_storage, from_write};
use msmq_protocol::{ErrorCode, ErrorReply, PluginSpec, Reply, StateEntry};
use std::sync::Arc;

/// Most entries one `PluginState` request returns.
pub const STATE_ENTRIES_PER_REQUEST_MAX: u32 = 10_000;

fn from_plugin(e: PluginError) -> ErrorReply {
    match e {
        PluginError::Unknown(_) => ErrorReply::new(ErrorCode::UNKNOWN_PLUGIN, e.to_string()),
        PluginError::Invalid(_) => ErrorReply::new(ErrorCode::INVALID_ARGUMENT, e.to_string()),
        PluginError::UnknownTopic(_) => ErrorReply::new(ErrorCode::UNKNOWN_TOPIC, e.to_string()),
        PluginError::Refused(_) => ErrorReply::new(ErrorCode::PLUGIN_REFUSED, e.to_string()),
        PluginError::Write(w) => from_write(w),
        PluginError::Storage(s) => from_storage(s),
        PluginError::Internal(_) => ErrorReply::new(ErrorCode::INTERNAL, e.to_string()),
    }
}

pub(crate) async fn deploy(
    state: &Arc<BrokerState>,
    spec: PluginSpec,
    component: Vec<u8>,
) -> Result<Reply, ErrorReply> {
    PluginManager::deploy(state, spec, component)
        .await
        .map(Reply::PluginDeployed)
        .map_err(from_plugin)
}

pub(crate) fn stats(state: &BrokerState, name: &str) -> Result<Reply, ErrorReply> {
    state
        .plugins
        .stats(state, name)
        .map(Reply::PluginStats)
        .map_err(from_plugin)
}

pub(crate) async fn set_paused(
    state: &Arc<BrokerState>,
    name: &str,
    pause: bool,
) -> Result<Reply, ErrorReply> {
    PluginManager::set_paused(state, name, pause)
        .await
        .map(|()| Reply::Done)
        .map_err(from_plugin)
}

pub(crate) async fn remove(state: &Arc<BrokerState>, name: &str) -> Result<Reply, ErrorReply> {
    PluginManager::remove(state, name)
        .await
        .map(|()| Reply::Done)
        .map_err(from_plugin)
}

pub(crate) async fn state(
    state: &BrokerState,
    name: String,
    prefix: Vec<u8>,
    start_after: Option<Vec<u8>>,
    limit: u32,
) -> Result<Reply, ErrorReply> {
    if !state.plugins.names().contains(&name) {
        return Err(from_plugin(PluginError::Unknown(name)));
    }
    let limit = limit.clamp(1, STATE_ENTRIES_PER_REQUEST_MAX) as usize;
    let db = state.store.db().clone();
    let entries = blocking(move || {
        let txn = crate::storage::ReadSource::read_txn(&db)?;
        crate::storage::read::plugin_state_scan(&txn, &name, &prefix, start_after.as_deref(), limit)
    })
    .await?;
    Ok(Reply::PluginState(
        entries
            .into_iter()
            .map(|(key, value)| StateEntry { key, value })
            .collect(),
    ))
}
