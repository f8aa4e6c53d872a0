//! Wire records of the plugin admin requests: what a deploy asks for, and
//! what list and stats report.
//!
//! Field order is wire format: append, never reorder.

use serde::{Deserialize, Serialize};

/// Default linear-memory cap of a plugin instance.
pub const PLUGIN_MEMORY_BYTES_DEFAULT: u64 = 64 * 1024 * 1024;
/// Default time one `handle-batch` call may run before it is interrupted.
pub const PLUGIN_BATCH_TIME_MS_DEFAULT: u32 = 1000;
/// Default largest batch handed to a plugin.
pub const PLUGIN_BATCH_MESSAGES_DEFAULT: u32 = 100;
/// Default deliveries of one message (first plus retries) before it is
/// dead-lettered.
pub const PLUGIN_DELIVERY_ATTEMPTS_DEFAULT: u32 = 5;
/// Default consecutive failed calls after which a plugin is paused.
pub const PLUGIN_FAILURES_BEFORE_PAUSE_DEFAULT: u32 = 10;

/// The limits a plugin runs under. `0` in a quota means unlimited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginLimits {
    /// Linear memory (and tables) one instance may grow to.
    pub memory_bytes_max: u64,
    /// Wall-clock time one batch call may take before it is interrupted.
    pub batch_time_ms_max: u32,
    /// Largest batch handed to the plugin.
    pub batch_messages_max: u32,
    /// Throughput quota in messages per second (0: unlimited).
    pub messages_per_second: u32,
    /// Throughput quota in payload bytes per second (0: unlimited).
    pub bytes_per_second: u64,
    /// Deliveries of one message (first plus retries) before it goes to the
    /// dead-letter topic.
    pub delivery_attempts_max: u32,
    /// Consecutive failed calls (trap, timeout, memory) after which the
    /// plugin is paused and reported.
    pub failures_before_pause: u32,
}

impl Default for PluginLimits {
    fn default() -> Self {
        PluginLimits {
            memory_bytes_max: PLUGIN_MEMORY_BYTES_DEFAULT,
            batch_time_ms_max: PLUGIN_BATCH_TIME_MS_DEFAULT,
            batch_messages_max: PLUGIN_BATCH_MESSAGES_DEFAULT,
            messages_per_second: 0,
            bytes_per_second: 0,
            delivery_attempts_max: PLUGIN_DELIVERY_ATTEMPTS_DEFAULT,
            failures_before_pause: PLUGIN_FAILURES_BEFORE_PAUSE_DEFAULT,
        }
    }
}

/// Everything about a plugin but its component.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginSpec {
    pub name: String,
    /// The topic it consumes.
    pub topic: String,
    /// The consumer group its progress is stored under; `None`:
    /// `plugin.<name>`.
    pub group: Option<String>,
    /// Topics it may publish to.
    pub publish_to: Vec<String>,
    /// Passed to its `init`.
    pub config: Vec<(String, String)>,
    pub limits: PluginLimits,
}

impl PluginSpec {
    /// A plugin consuming `topic` with default limits, no publish rights
    /// and no config.
    pub fn new(name: impl Into<String>, topic: impl Into<String>) -> Self {
        PluginSpec {
            name: name.into(),
            topic: topic.into(),
            group: None,
            publish_to: vec![],
            config: vec![],
            limits: PluginLimits::default(),
        }
    }

    /// The consumer group the plugin's progress is stored under.
    pub fn group_name(&self) -> String {
        self.group
            .clone()
            .unwrap_or_else(|| format!("plugin.{}", self.name))
    }
}

/// The answer to a deploy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginDeployed {
    pub name: String,
    /// 1 for a new plugin, then one more per upgrade.
    pub version: u32,
    /// SHA-256 of the component, hex.
    pub component_sha256: String,
    /// Whether it replaced a running version (hot reload).
    pub upgraded: bool,
    /// Time spent compiling (0 when the compiled form was cached).
    pub compile_ms: u64,
}

/// A plugin as `ListPlugins` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginInfo {
    pub spec: PluginSpec,
    pub version: u32,
    pub component_sha256: String,
    pub component_bytes: u64,
    /// `running`, `paused`, or `paused: <why>` when the broker paused it.
    pub status: String,
    pub deployed_at_ms: u64,
}

/// Counters of one plugin since the broker started (lag is current).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PluginStats {
    pub name: String,
    pub version: u32,
    pub status: String,
    /// Messages whose outcome was committed (ack, retry or dead letter).
    pub processed: u64,
    pub acked: u64,
    /// Messages the plugin asked to see again later.
    pub retried: u64,
    pub dead_lettered: u64,
    /// Batch calls that failed (trap, timeout, memory limit, bad outcome count).
    pub failed_batches: u64,
    pub batches: u64,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
    /// Messages published by the plugin (committed).
    pub published: u64,
    /// Messages waiting: not yet consumed on its topic, plus retries pending.
    pub lag: u64,
    /// Time spent waiting for the throughput quota.
    pub throttled_ms: u64,
    /// Time spent inside plugin calls.
    pub busy_ms: u64,
    /// Linear memory of the current instance.
    pub memory_bytes: u64,
    /// Time from the last upgrade's deploy acknowledgement to the new
    /// version's first batch.
    pub last_swap_ms: Option<u64>,
    /// Messages per second over the last few seconds.
    pub recent_messages_per_second: u64,
    /// Instances replaced between batches because their memory passed the
    /// recycle threshold (three quarters of the limit).
    pub instances_recycled: u64,
}

/// One key-value entry of a plugin's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateEntry {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}
