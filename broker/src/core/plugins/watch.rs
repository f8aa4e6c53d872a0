//! `--plugin-dir`: a directory whose `.wasm` files, each with a `.toml`
//! manifest of the same name, are the plugins deployed from it.
//!
//! Owns: the watcher and the set of plugins it deployed.
//!
//! Invariants: the directory is rescanned after every change it reports
//! (and every few seconds anyway); a plugin is deployed when its files
//! appear, redeployed (hot reload) when the component or manifest changes,
//! and removed when its `.wasm` is deleted. Plugins deployed otherwise are
//! never touched. A bad file is logged and skipped; the others go on.

use super::{PluginError, PluginManager};
use crate::core::BrokerState;
use bytesize::ByteSize;
use msmq_protocol::{PluginLimits, PluginSpec};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// How long changes settle before the directory is scanned.
pub const SETTLE_MS: u64 = 200;
/// Rescan this often even without change events.
pub const RESCAN_MS: u64 = 2_000;

/// `NAME.toml` beside `NAME.wasm`. Every key but `topic` is optional.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub topic: String,
    pub group: Option<String>,
    #[serde(default)]
    pub publish_to: Vec<String>,
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    pub memory: Option<ByteSize>,
    #[serde(default, with = "humantime_serde")]
    pub batch_time: Option<Duration>,
    pub batch_messages_max: Option<u32>,
    pub messages_per_second: Option<u32>,
    pub bytes_per_second: Option<ByteSize>,
    pub delivery_attempts_max: Option<u32>,
    pub failures_before_pause: Option<u32>,
}

impl Manifest {
    pub fn into_spec(self, name: String) -> PluginSpec {
        let d = PluginLimits::default();
        PluginSpec {
            name,
            topic: self.topic,
            group: self.group,
            publish_to: self.publish_to,
            config: self.config.into_iter().collect(),
            limits: PluginLimits {
                memory_bytes_max: self.memory.map_or(d.memory_bytes_max, |b| b.as_u64()),
                batch_time_ms_max: self.batch_time.map_or(d.batch_time_ms_max, |t| {
                    // Too long for u32 ms: out of range, refused at deploy.
                    u32::try_from(t.as_millis()).unwrap_or(u32::MAX)
                }),
                batch_messages_max: self.batch_messages_max.unwrap_or(d.batch_messages_max),
                messages_per_second: self.messages_per_second.unwrap_or(0),
                bytes_per_second: self.bytes_per_second.map_or(0, |b| b.as_u64()),
                delivery_attempts_max: self
                    .delivery_attempts_max
                    .unwrap_or(d.delivery_attempts_max),
                failures_before_pause: self
                    .failures_before_pause
                    .unwrap_or(d.failures_before_pause),
            },
        }
    }
}

/// Watch `dir` until the broker stops.
pub async fn run(state: Arc<BrokerState>, dir: PathBuf) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let watcher = notify::recommended_watcher(move |_event: notify::Result<notify::Event>| {
        let _ = tx.send(());
    })
    .and_then(|mut w| {
        use notify::Watcher;
        w.watch(&dir, notify::RecursiveMode::NonRecursive)?;
        Ok(w)
    });
    let _watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the plugin directory; rescanning every {RESCAN_MS} ms");
            None
        }
    };
    tracing::info!(dir = %dir.display(), "watching the plugin directory");
    let mut applied = Applied::default();
    // Plugins deployed from here in an earlier run, with the same files,
    // count as applied; changed files are deployed again.
    for info in state.plugins.list() {
        if let Ok(Some((bytes, manifest))) = read_pair(&dir, &info.spec.name) {
            let sha = super::engine::sha256_hex(&bytes);
            if manifest.clone().into_spec(info.spec.name.clone()) == info.spec
                && sha == info.component_sha256
            {
                applied
                    .deployed
                    .insert(info.spec.name.clone(), (sha, manifest));
            }
        }
    }
    loop {
        scan(&state, &dir, &mut applied).await;
        tokio::select! {
            Some(()) = rx.recv() => {
                tokio::time::sleep(Duration::from_millis(SETTLE_MS)).await;
                while rx.try_recv().is_ok() {}
            }
            _ = tokio::time::sleep(Duration::from_millis(RESCAN_MS)) => {}
        }
        if state.is_shutting_down() {
            return;
        }
    }
}

/// What the watcher did with each file pair.
#[derive(Default)]
struct Applied {
    /// Deployed from here: name → (component sha256, manifest).
    deployed: HashMap<String, (String, Manifest)>,
    /// Refused for good (bad component or manifest): not retried until the
    /// files change, never removed by this watcher.
    refused: HashMap<String, (String, Manifest)>,
}

/// The component and manifest of `name`, if both exist.
fn read_pair(dir: &Path, name: &str) -> anyhow::Result<Option<(Vec<u8>, Manifest)>> {
    let wasm = dir.join(format!("{name}.wasm"));
    let toml_path = dir.join(format!("{name}.toml"));
    if !wasm.exists() || !toml_path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&toml_path)?;
    let manifest: Manifest =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", toml_path.display()))?;
    let bytes = std::fs::read(&wasm)?;
    Ok(Some((bytes, manifest)))
}

async fn scan(state: &Arc<BrokerState>, dir: &Path, applied: &mut Applied) {
    let mut present = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "wasm") {
                if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                    present.push(stem.to_string());
                }
            }
        }
    }
    for name in &present {
        let (bytes, manifest) = match read_pair(dir, name) {
            Ok(Some(pair)) => pair,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(plugin = %name, error = %e, "plugin directory entry skipped");
                continue;
            }
        };
        let sha = super::engine::sha256_hex(&bytes);
        let same = |seen: Option<&(String, Manifest)>| {
            seen.is_some_and(|(s, m)| *s == sha && *m == manifest)
        };
        if same(applied.deployed.get(name)) || same(applied.refused.get(name)) {
            continue;
        }
        let spec = manifest.clone().into_spec(name.clone());
        match PluginManager::deploy(state, spec, bytes).await {
            Ok(done) => {
                tracing::info!(plugin = %name, version = done.version, upgraded = done.upgraded, "deployed from the plugin directory");
                applied.refused.remove(name);
                applied.deployed.insert(name.clone(), (sha, manifest));
            }
            Err(e @ (PluginError::Refused(_) | PluginError::Invalid(_))) => {
                tracing::warn!(plugin = %name, error = %e, "plugin directory deploy refused; fix the files to try again");
                applied.refused.insert(name.clone(), (sha, manifest));
            }
            Err(e) => {
                // Perhaps its topic does not exist yet: try again next scan.
                tracing::warn!(plugin = %name, error = %e, "plugin directory deploy failed; will retry");
            }
        }
    }
    applied.refused.retain(|n, _| present.contains(n));
    let gone: Vec<String> = applied
        .deployed
        .keys()
        .filter(|n| !present.contains(n))
        .cloned()
        .collect();
    for name in gone {
        applied.deployed.remove(&name);
        match PluginManager::remove(state, &name).await {
            Ok(()) => tracing::info!(plugin = %name, "removed: its file left the plugin directory"),
            Err(e) => {
                tracing::warn!(plugin = %name, error = %e, "removing a plugin whose file was deleted failed")
            }
        }
    }
}
