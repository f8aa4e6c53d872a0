//! Consumer plugins: sandboxed Wasm components that consume a topic inside
//! the broker.
//!
//! Owns: the plugin records (stored in redb with their components), the one
//! [`engine::PluginEngine`], and one runner thread per deployed plugin.
//!
//! Invariants:
//! - A plugin's effects for a batch (state writes, publishes, retries, dead
//!   letters, its group's offsets) are committed in one storage transaction
//!   or not at all, so every input is processed exactly once as far as
//!   anything outside the plugin can tell.
//! - One runner thread per plugin, so batches of a plugin never overlap; an
//!   upgrade is swapped in between batches and continues from the committed
//!   offsets.
//! - A misbehaving plugin (trap, timeout, memory) affects only itself: it is
//!   retried with back-off, its poison messages dead-lettered, and after
//!   `failures_before_pause` consecutive failures it is paused.

pub mod check;
pub mod engine;
pub mod host;
mod instance;
pub mod quota;
mod runner;
pub mod wasi;
pub mod watch;

use crate::core::BrokerState;
use engine::{PluginEngine, Prepared, RefusedComponent};
use msmq_protocol::{PluginInfo, PluginSpec, PluginStats};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Longest plugin name (the same rule as topic names).
pub const PLUGIN_NAME_BYTES_MAX: usize = msmq_protocol::names::NAME_BYTES_MAX;
/// Largest batch a plugin may ask for.
pub const PLUGIN_BATCH_MESSAGES_MAX: u32 = 10_000;
/// Longest batch time limit a plugin may ask for.
pub const PLUGIN_BATCH_TIME_MS_MAX: u32 = 60_000;
/// Smallest memory limit (a component needs some memory to start).
pub const PLUGIN_MEMORY_BYTES_MIN: u64 = 1024 * 1024;
/// Largest memory limit.
pub const PLUGIN_MEMORY_BYTES_MAX: u64 = 4 * 1024 * 1024 * 1024;
/// How long stopping a plugin waits for its current batch.
pub const PLUGIN_STOP_WAIT_MS: u64 = 5_000;

pub use crate::command::PluginRecord;

/// Why a plugin request failed.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("no plugin named {0:?} is deployed")]
    Unknown(String),
    #[error("{0}")]
    Invalid(String),
    #[error("unknown topic {0:?}")]
    UnknownTopic(String),
    #[error("plugin refused: {0}")]
    Refused(#[from] RefusedComponent),
    #[error(transparent)]
    Write(#[from] crate::storage::WriteError),
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    #[error("internal: {0}")]
    Internal(String),
}

/// Deployed plugins and their runners.
pub struct PluginManager {
    engine: PluginEngine,
    runners: Mutex<HashMap<String, runner::RunnerHandle>>,
    /// Serialises deploys, removes, pauses and resumes.
    admin: tokio::sync::Mutex<()>,
    /// Set at shutdown: no runner starts any more.
    closed: std::sync::atomic::AtomicBool,
    /// Stored plugins whose component could not be loaded at start-up, with
    /// why: listed, removable, and replaced by a new deploy.
    unloadable: Mutex<HashMap<String, (PluginRecord, String)>>,
}

impl PluginManager {
    pub fn new(engine: PluginEngine) -> Self {
        PluginManager {
            engine,
            runners: Mutex::new(HashMap::new()),
            admin: tokio::sync::Mutex::new(()),
            closed: std::sync::atomic::AtomicBool::new(false),
            unloadable: Mutex::new(HashMap::new()),
        }
    }

    /// Start a runner for every stored plugin (at broker start).
    pub async fn start_stored(state: &Arc<BrokerState>) -> Result<usize, PluginError> {
        let db = state.store.db().clone();
        let records =
            tokio::task::spawn_blocking(move || crate::storage::read::plugin_records(&db))
                .await
                .map_err(|e| PluginError::Internal(e.to_string()))??;
        let count = records.len();
        for record in records {
            let db = state.store.db().clone();
            let engine = state.plugins.engine.clone();
            let hash = record.component_sha256.clone();
            let prepared = tokio::task::spawn_blocking(move || {
                let bytes = crate::storage::read::plugin_component(&db, &hash)?
                    .ok_or_else(|| PluginError::Internal(format!("component {hash} missing")))?;
                engine
                    .prepare(&bytes, usize::MAX)
                    .map_err(PluginError::from)
            })
            .await
            .map_err(|e| PluginError::Internal(e.to_string()))?;
            match prepared {
                Ok(prepared) => {
                    tracing::info!(plugin = %record.spec.name, version = record.version,
                        status = %record.status(), "plugin loaded");
                    state.plugins.spawn(state, record, prepared, None);
                }
                Err(e) => {
                    tracing::error!(plugin = %record.spec.name, error = %e, "stored plugin cannot be loaded; it stays deployed but does not run");
                    state
                        .plugins
                        .unloadable
                        .lock()
                        .expect("unloadable lock")
                        .insert(record.spec.name.clone(), (record, e.to_string()));
                }
            }
        }
        Ok(count)
    }

    pub fn engine(&self) -> &PluginEngine {
        &self.engine
    }

    fn spawn(
        &self,
        state: &Arc<BrokerState>,
        record: PluginRecord,
        prepared: Prepared,
        instance: Option<runner::Instance>,
    ) {
        let mut runners = self.runners.lock().expect("runner lock");
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let name = record.spec.name.clone();
        self.unloadable
            .lock()
            .expect("unloadable lock")
            .remove(&name);
        runners.insert(
            name,
            runner::spawn(state.clone(), record, prepared, instance),
        );
    }

    /// Deploy a new plugin or upgrade a running one.
    pub async fn deploy(
        state: &Arc<BrokerState>,
        spec: PluginSpec,
        component: Vec<u8>,
    ) -> Result<msmq_protocol::PluginDeployed, PluginError> {
        validate_spec(state, &spec)?;
        let manager = &state.plugins;
        let _admin = manager.admin.lock().await;
        let size_max = state.config.plugin_component_bytes_max.as_u64() as usize;
        let engine = manager.engine.clone();
        let (prepared, component) = tokio::task::spawn_blocking(move || {
            engine
                .prepare(&component, size_max)
                .map(|prepared| (prepared, component))
        })
        .await
        .map_err(|e| PluginError::Internal(e.to_string()))??;
        // Run `init` once with the real config and limits before accepting;
        // that instance then handles the first batch.
        let instance = {
            let state2 = state.clone();
            let spec2 = spec.clone();
            let prepared2 = prepared.clone();
            tokio::task::spawn_blocking(move || runner::trial_init(&state2, &spec2, &prepared2))
                .await
                .map_err(|e| PluginError::Internal(e.to_string()))?
                .map_err(|e| PluginError::Refused(RefusedComponent::InitFailed(e)))?
        };
        let previous = {
            let db = state.store.db().clone();
            let name = spec.name.clone();
            tokio::task::spawn_blocking(move || {
                crate::storage::read::plugin_records(&db)
                    .map(|all| all.into_iter().find(|r| r.spec.name == name))
            })
            .await
            .map_err(|e| PluginError::Internal(e.to_string()))??
        };
        let upgraded = previous.is_some();
        let group = spec.group_name();
        if let Some(owner) = manager.group_owner(&group).filter(|o| *o != spec.name) {
            return Err(PluginError::Invalid(format!(
                "group {group:?} already holds the progress of plugin {owner:?}"
            )));
        }
        let members = state.with_groups(|g, _| g.group(&group).map_or(0, |g| g.members.len()));
        if members > 0 {
            return Err(PluginError::Invalid(format!(
                "group {group:?} has {members} live consumers; a plugin needs a group of its own"
            )));
        }
        if let Some(prev) = &previous {
            if prev.spec.topic != spec.topic || prev.spec.group_name() != spec.group_name() {
                return Err(PluginError::Invalid(format!(
                    "plugin {:?} consumes {:?} as group {:?}; an upgrade must keep both (remove it first to change them)",
                    spec.name,
                    prev.spec.topic,
                    prev.spec.group_name()
                )));
            }
        }
        let record = PluginRecord {
            version: previous.as_ref().map_or(1, |p| p.version + 1),
            component_sha256: prepared.sha256.clone(),
            component_bytes: prepared.bytes_len as u64,
            paused: previous.as_ref().and_then(|p| p.paused.clone()),
            deployed_at_ms: state.now_ms(),
            incarnation: previous
                .as_ref()
                .map_or_else(rand::random::<u64>, |p| p.incarnation),
            spec,
        };
        state
            .submit(crate::command::Command::PluginPut {
                record: Box::new(record.clone()),
                component: Some(component),
            })
            .await?;
        let reply = msmq_protocol::PluginDeployed {
            name: record.spec.name.clone(),
            version: record.version,
            component_sha256: record.component_sha256.clone(),
            upgraded,
            compile_ms: prepared.compile_time.as_millis() as u64,
        };
        let acknowledged = Instant::now();
        let running = manager
            .runners
            .lock()
            .expect("runner lock")
            .get(&record.spec.name)
            .map(|h| h.shared.clone());
        match running {
            Some(shared) => {
                tracing::info!(plugin = %record.spec.name, version = record.version, "plugin upgrade queued for the next batch boundary");
                shared.upgrade(record, prepared, acknowledged, Some(instance));
            }
            None => {
                tracing::info!(plugin = %record.spec.name, version = record.version,
                    topic = %record.spec.topic, group = %record.spec.group_name(), "plugin deployed");
                manager.spawn(state, record, prepared, Some(instance));
            }
        }
        Ok(reply)
    }

    /// Pause (`pause = true`) or resume a plugin.
    pub async fn set_paused(
        state: &Arc<BrokerState>,
        name: &str,
        pause: bool,
    ) -> Result<(), PluginError> {
        let manager = &state.plugins;
        let _admin = manager.admin.lock().await;
        let shared = manager.shared(name)?;
        let paused = pause.then(String::new);
        state
            .submit(crate::command::Command::PluginSetPaused {
                name: name.to_string(),
                incarnation: shared.record().incarnation,
                paused: paused.clone(),
            })
            .await?;
        shared.set_record_paused(paused);
        tracing::info!(
            plugin = name,
            "plugin {}",
            if pause { "paused" } else { "resumed" }
        );
        Ok(())
    }

    /// Stop and forget a plugin, its state and its progress.
    pub async fn remove(state: &Arc<BrokerState>, name: &str) -> Result<(), PluginError> {
        let manager = &state.plugins;
        let _admin = manager.admin.lock().await;
        let broken = manager
            .unloadable
            .lock()
            .expect("unloadable lock")
            .get(name)
            .map(|(r, _)| r.spec.group_name());
        if let Some(group) = broken {
            state
                .submit(crate::command::Command::PluginRemove {
                    name: name.to_string(),
                    group,
                })
                .await?;
            manager
                .unloadable
                .lock()
                .expect("unloadable lock")
                .remove(name);
            tracing::info!(plugin = name, "unloadable plugin removed");
            return Ok(());
        }
        let handle = manager
            .runners
            .lock()
            .expect("runner lock")
            .remove(name)
            .ok_or_else(|| PluginError::Unknown(name.to_string()))?;
        let group = handle.shared.record().spec.group_name();
        handle.shared.request_stop();
        let written = state
            .submit(crate::command::Command::PluginRemove {
                name: name.to_string(),
                group,
            })
            .await;
        if let Err(e) = written {
            // Nothing was removed: the plugin goes on as it was.
            handle.shared.cancel_stop();
            manager
                .runners
                .lock()
                .expect("runner lock")
                .insert(name.to_string(), handle);
            return Err(e.into());
        }
        // From here on a late commit of its last batch is fenced off.
        let stopped = tokio::task::spawn_blocking(move || {
            handle.stop(Duration::from_millis(PLUGIN_STOP_WAIT_MS))
        })
        .await
        .unwrap_or(false);
        if !stopped {
            tracing::warn!(
                plugin = name,
                "plugin did not stop in time; its last batch cannot commit"
            );
        }
        tracing::info!(plugin = name, "plugin removed");
        Ok(())
    }

    fn shared(&self, name: &str) -> Result<Arc<runner::RunnerShared>, PluginError> {
        self.runners
            .lock()
            .expect("runner lock")
            .get(name)
            .map(|h| h.shared.clone())
            .ok_or_else(|| PluginError::Unknown(name.to_string()))
    }

    pub fn list(&self) -> Vec<PluginInfo> {
        let mut all: Vec<PluginInfo> = self
            .runners
            .lock()
            .expect("runner lock")
            .values()
            .map(|h| {
                let r = h.shared.record();
                PluginInfo {
                    status: r.status(),
                    version: r.version,
                    component_sha256: r.component_sha256.clone(),
                    component_bytes: r.component_bytes,
                    deployed_at_ms: r.deployed_at_ms,
                    spec: r.spec,
                }
            })
            .collect();
        for (r, why) in self.unloadable.lock().expect("unloadable lock").values() {
            all.push(PluginInfo {
                status: unloadable_status(why),
                version: r.version,
                component_sha256: r.component_sha256.clone(),
                component_bytes: r.component_bytes,
                deployed_at_ms: r.deployed_at_ms,
                spec: r.spec.clone(),
            });
        }
        all.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        all
    }

    pub fn stats(&self, state: &BrokerState, name: &str) -> Result<PluginStats, PluginError> {
        if let Some((r, why)) = self.unloadable.lock().expect("unloadable lock").get(name) {
            return Ok(PluginStats {
                name: name.to_string(),
                version: r.version,
                status: unloadable_status(why),
                last_error: Some(why.clone()),
                ..PluginStats::default()
            });
        }
        Ok(self.shared(name)?.stats(state))
    }

    /// The plugin whose progress is stored under `group`, if any.
    pub fn group_owner(&self, group: &str) -> Option<String> {
        let running = self
            .runners
            .lock()
            .expect("runner lock")
            .values()
            .map(|h| h.shared.record().spec)
            .find(|spec| spec.group_name() == group)
            .map(|spec| spec.name);
        running.or_else(|| {
            self.unloadable
                .lock()
                .expect("unloadable lock")
                .values()
                .find(|(r, _)| r.spec.group_name() == group)
                .map(|(r, _)| r.spec.name.clone())
        })
    }

    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .runners
            .lock()
            .expect("runner lock")
            .keys()
            .cloned()
            .collect();
        names.extend(
            self.unloadable
                .lock()
                .expect("unloadable lock")
                .keys()
                .cloned(),
        );
        names
    }

    /// Stop every runner after its current batch (broker shutdown); no new
    /// runner starts afterwards.
    pub fn stop_all(&self, wait: Duration) {
        let handles: Vec<_> = {
            let mut runners = self.runners.lock().expect("runner lock");
            self.closed
                .store(true, std::sync::atomic::Ordering::Release);
            runners.drain().map(|(_, h)| h).collect()
        };
        for h in &handles {
            h.shared.request_stop();
        }
        let deadline = std::time::Instant::now() + wait;
        for h in handles {
            h.stop(deadline.saturating_duration_since(std::time::Instant::now()));
        }
    }
}

fn unloadable_status(why: &str) -> String {
    format!("not running: its component could not be loaded ({why}); deploy it again or remove it")
}

fn validate_spec(state: &BrokerState, spec: &PluginSpec) -> Result<(), PluginError> {
    use msmq_protocol::names::validate_name;
    validate_name("plugin", &spec.name).map_err(PluginError::Invalid)?;
    validate_name("group", &spec.group_name()).map_err(PluginError::Invalid)?;
    if state.registry.get(&spec.topic).is_none() {
        return Err(PluginError::UnknownTopic(spec.topic.clone()));
    }
    for topic in &spec.publish_to {
        validate_name("topic", topic).map_err(PluginError::Invalid)?;
    }
    let l = &spec.limits;
    let check = |ok: bool, what: String| {
        if ok {
            Ok(())
        } else {
            Err(PluginError::Invalid(what))
        }
    };
    check(
        (PLUGIN_MEMORY_BYTES_MIN..=PLUGIN_MEMORY_BYTES_MAX).contains(&l.memory_bytes_max),
        format!(
            "memory_bytes_max must be {PLUGIN_MEMORY_BYTES_MIN}..={PLUGIN_MEMORY_BYTES_MAX}, not {}",
            l.memory_bytes_max
        ),
    )?;
    check(
        (1..=PLUGIN_BATCH_TIME_MS_MAX).contains(&l.batch_time_ms_max),
        format!(
            "batch_time_ms_max must be 1..={PLUGIN_BATCH_TIME_MS_MAX}, not {}",
            l.batch_time_ms_max
        ),
    )?;
    check(
        (1..=PLUGIN_BATCH_MESSAGES_MAX).contains(&l.batch_messages_max),
        format!(
            "batch_messages_max must be 1..={PLUGIN_BATCH_MESSAGES_MAX}, not {}",
            l.batch_messages_max
        ),
    )?;
    check(
        l.delivery_attempts_max >= 1,
        "delivery_attempts_max must be at least 1".into(),
    )?;
    check(
        l.failures_before_pause >= 1,
        "failures_before_pause must be at least 1".into(),
    )?;
    Ok(())
}
