//! The core: the broker's state and its domain operations, between the wire
//! (`server/`) and storage.
//!
//! Owns: [`BrokerState`] (configuration, the store, topics, groups, per-message
//! acks, tokens and ACLs, plugins, the disk watermark, the clock), the
//! operations the wire and the plugin runner both call (per-message acks and
//! dead letters in [`ack`], shared reads in [`read`]), and the background work
//! that changes state on a timer: scheduled releases ([`scheduler`]),
//! retention ([`retention`]), lease expiry, the disk check ([`disk`]) and the
//! plugin runners ([`plugins`]).
//!
//! Invariants: nothing here imports `server`; time comes from
//! [`BrokerState::clock`]; every durable change goes through the store's
//! writer as a command, so the wire is only one of several callers (the
//! plugin runner, the timers, and tomorrow a replication apply loop).

pub mod ack;
pub mod disk;
mod log;
pub mod ops;
pub mod plugins;
pub mod read;
pub mod retention;
pub mod scheduler;

use crate::clock::Clock;
use crate::config::Config;
use crate::groups::{Coordinator, GroupError};
use crate::producers::ProducerError;
use crate::storage::{StorageError, Store, StoreOptions, WriteError};
use crate::topics::TopicRegistry;
use anyhow::Context;
use msmq_protocol::{ErrorCode, ErrorReply};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Retry hint given with `PRODUCERS_FULL`.
pub const PRODUCERS_FULL_RETRY_AFTER_MS: u32 = 60_000;

/// The broker's state, shared by the wire, the plugin runners and the timers.
pub struct BrokerState {
    pub config: Config,
    pub store: Store,
    pub registry: Arc<TopicRegistry>,
    pub groups: Mutex<Coordinator>,
    /// Leases, retries and policies of groups using per-message acks.
    pub acks: Mutex<crate::delivery::AckRegistry>,
    /// Tokens and their principals.
    pub tokens: crate::auth::Tokens,
    /// What each principal may do (with authentication on).
    pub acls: crate::auth::Acls,
    /// Deployed plugins and their runners.
    pub plugins: plugins::PluginManager,
    /// Free space of the data directory's filesystem.
    pub disk: disk::DiskWatch,
    /// Wall-clock time for everything stored.
    pub clock: Clock,
    /// Signalled when a message is scheduled, so the scheduler looks again.
    pub scheduler_wake: tokio::sync::Notify,
    /// Signalled at every disk check while the disk is low, so retention
    /// runs then instead of waiting for its own interval.
    pub retention_wake: tokio::sync::Notify,
    shutting_down: AtomicBool,
}

impl BrokerState {
    /// Open storage and load what lives in memory (acks, tokens, ACLs, the
    /// plugin engine). Plugins are started by [`Self::start`].
    pub async fn open(config: Config, clock: Clock) -> anyhow::Result<Arc<BrokerState>> {
        let registry = Arc::new(TopicRegistry::default());
        let data_dir = config.data_dir.clone();
        let options = store_options(&config);
        let store_registry = registry.clone();
        let store =
            tokio::task::spawn_blocking(move || Store::open(&data_dir, options, store_registry))
                .await
                .context("opening storage")??;
        Self::with_store(config, clock, store, registry).await
    }

    /// The state over a store already open.
    async fn with_store(
        config: Config,
        clock: Clock,
        store: Store,
        registry: Arc<TopicRegistry>,
    ) -> anyhow::Result<Arc<BrokerState>> {
        let acks = ack::load_acks(&store).await?;
        let tokens = {
            let db = store.db().clone();
            tokio::task::spawn_blocking(move || crate::storage::read::tokens(&db))
                .await
                .context("loading tokens")??
        };
        let tokens = crate::auth::Tokens::load(tokens);
        let acls = {
            let db = store.db().clone();
            tokio::task::spawn_blocking(move || crate::storage::read::acls(&db))
                .await
                .context("loading ACLs")??
        };
        let acls = crate::auth::Acls::load(acls);
        let plugin_engine = {
            let data_dir = config.data_dir.clone();
            tokio::task::spawn_blocking(move || plugins::engine::PluginEngine::new(&data_dir))
                .await
                .context("starting the plugin engine")??
        };
        Ok(Arc::new(BrokerState {
            config,
            store,
            registry,
            groups: Mutex::new(Coordinator::default()),
            acks: Mutex::new(acks),
            plugins: plugins::PluginManager::new(plugin_engine),
            disk: disk::DiskWatch::default(),
            tokens,
            acls,
            clock,
            scheduler_wake: tokio::sync::Notify::new(),
            retention_wake: tokio::sync::Notify::new(),
            shutting_down: AtomicBool::new(false),
        }))
    }

    /// Measure the disk, start the stored plugins and the core's timers.
    pub async fn start(
        state: &Arc<BrokerState>,
    ) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
        // Know the disk's state before the first produce arrives.
        state
            .disk
            .measure(&state.config.data_dir, state.config.disk_free_min.as_u64());
        let loaded = plugins::PluginManager::start_stored(state)
            .await
            .context("loading plugins")?;
        if loaded > 0 {
            tracing::info!(plugins = loaded, "plugins loaded");
        }
        let mut background = vec![
            tokio::spawn(session_checker(state.clone())),
            tokio::spawn(ack::expire_leases(state.clone())),
            tokio::spawn(scheduler::run(state.clone())),
            tokio::spawn(retention::run(state.clone())),
            tokio::spawn(disk::run(state.clone())),
        ];
        if let Some(dir) = state.config.plugin_dir.clone() {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("creating plugin directory {}", dir.display()))?;
            background.push(tokio::spawn(plugins::watch::run(state.clone(), dir)));
        }
        Ok(background)
    }

    /// Wall-clock ms from the broker's clock.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// From now on, refuse new work.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }

    /// Run `f` on the coordinator with a partition-count lookup.
    pub fn with_groups<R>(
        &self,
        f: impl FnOnce(&mut Coordinator, &dyn Fn(&str) -> Option<u32>) -> R,
    ) -> R {
        let registry = &self.registry;
        let partitions_of = |t: &str| registry.partitions_of(t);
        let mut groups = self.groups.lock().expect("group lock");
        f(&mut groups, &partitions_of)
    }
}

/// The store's options from the broker's configuration.
pub fn store_options(config: &Config) -> StoreOptions {
    StoreOptions {
        durability: config.durability,
        cache_bytes: config.cache_bytes.as_u64() as usize,
        commit_bytes_max: config.commit_bytes_max.as_u64() as usize,
        segment_roll_max: crate::storage::segments::Roll {
            bytes_max: config.segment_bytes_max.as_u64(),
            age_max: config.segment_age_max,
        },
        segment_prefill: config.segment_prefill,
        retention_default: (
            config.retention_default.as_millis() as u64,
            config.retention_bytes_default.as_u64(),
        ),
        observer: crate::metrics::storage_observer(),
        record_commands: config.record_commands.clone(),
    }
}

/// Drop group members that stopped heartbeating.
async fn session_checker(state: Arc<BrokerState>) {
    let mut ticker = tokio::time::interval(state.config.session_check_interval);
    loop {
        ticker.tick().await;
        let expired = state.with_groups(|g, partitions_of| g.expire(Instant::now(), partitions_of));
        for (group, member) in expired {
            tracing::info!(%group, member, "member session expired; partitions rebalanced");
        }
    }
}

pub(crate) fn invalid(message: impl Into<String>) -> ErrorReply {
    ErrorReply::new(ErrorCode::INVALID_ARGUMENT, message)
}

pub(crate) fn unknown_topic(name: &str) -> ErrorReply {
    ErrorReply::new(
        ErrorCode::UNKNOWN_TOPIC,
        format!("topic {name:?} does not exist"),
    )
}

pub(crate) fn from_write(e: WriteError) -> ErrorReply {
    let code = match &e {
        WriteError::TopicExists(_) => ErrorCode::TOPIC_EXISTS,
        WriteError::UnknownTopic(_) => ErrorCode::UNKNOWN_TOPIC,
        WriteError::PluginGone(_) => ErrorCode::UNKNOWN_PLUGIN,
        WriteError::Invalid(_) => ErrorCode::INVALID_ARGUMENT,
        WriteError::Storage(_) | WriteError::Corrupt(_) => ErrorCode::STORAGE_ERROR,
        WriteError::ShuttingDown => ErrorCode::SHUTTING_DOWN,
        WriteError::UnknownTransaction(_) => ErrorCode::UNKNOWN_TRANSACTION,
        WriteError::TransactionResolved { .. } => ErrorCode::TRANSACTION_RESOLVED,
        WriteError::WrongProducerGroup { .. } => ErrorCode::INVALID_ARGUMENT,
        WriteError::Producer(p) => match p {
            ProducerError::Unknown(_) => ErrorCode::UNKNOWN_PRODUCER,
            ProducerError::Fenced { .. } => ErrorCode::PRODUCER_FENCED,
            ProducerError::OutOfOrder { .. } => ErrorCode::SEQUENCE_OUT_OF_ORDER,
            ProducerError::Forgotten { .. } => ErrorCode::DUPLICATE_SEQUENCE,
            ProducerError::NotYours(_) => ErrorCode::FORBIDDEN,
            ProducerError::FutureEpoch { .. } | ProducerError::NotTheSameRequest { .. } => {
                ErrorCode::INVALID_ARGUMENT
            }
        },
        WriteError::ProducersFull(_) => {
            return ErrorReply {
                code: ErrorCode::PRODUCERS_FULL,
                message: e.to_string(),
                retry_after_ms: Some(PRODUCERS_FULL_RETRY_AFTER_MS),
            }
        }
    };
    ErrorReply::new(code, e.to_string())
}

pub(crate) fn from_storage(e: StorageError) -> ErrorReply {
    tracing::error!(error = %e, "storage read failed");
    ErrorReply::new(ErrorCode::STORAGE_ERROR, e.to_string())
}

pub(crate) fn from_group(e: GroupError) -> ErrorReply {
    let code = match &e {
        GroupError::UnknownMember { .. } => ErrorCode::UNKNOWN_MEMBER,
        GroupError::NotOwner(_) => ErrorCode::REBALANCED,
    };
    ErrorReply::new(code, e.to_string())
}

/// Run a blocking storage read off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, ErrorReply> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ErrorReply::new(ErrorCode::INTERNAL, format!("read task failed: {e}")))?
        .map_err(from_storage)
}
