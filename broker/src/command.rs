//! The commands of the deterministic core: what changes observable state,
//! as values that can be stored, sent and applied again.
//!
//! Owns: the records commands carry (a plugin's stored record here; tokens
//! in `auth`, retry records in `delivery`, transactions in `transactions`).
//! Invariant: nothing here reads the clock or draws a random number; a
//! value is decided by whoever builds it.

use msmq_protocol::PluginSpec;
use serde::{Deserialize, Serialize};

/// A deployed plugin as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginRecord {
    pub spec: PluginSpec,
    pub version: u32,
    pub component_sha256: String,
    pub component_bytes: u64,
    /// `None`: running. `Some("")`: paused by an operator. `Some(why)`:
    /// paused by the broker.
    pub paused: Option<String>,
    pub deployed_at_ms: u64,
    /// Random, fixed at first deploy: a batch started before a remove and
    /// redeploy cannot commit into the new plugin.
    pub incarnation: u64,
}

impl PluginRecord {
    pub fn status(&self) -> String {
        match &self.paused {
            None => "running".into(),
            Some(why) if why.is_empty() => "paused".into(),
            Some(why) => format!("paused: {why}"),
        }
    }
}
