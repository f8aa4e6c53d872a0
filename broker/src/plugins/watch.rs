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

use super::PluginManager;
use crate::server::BrokerState;
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
                batch_time_ms_max: self
                    .batch_time
                    .map_or(d.batch_time_ms_max, |t| t.as_millis() as u32),
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
    // name → (component sha256, manifest) last applied.
    let mut applied: HashMap<String, (String, Manifest)> = HashMap::new();
    // Plugins already deployed from here in an earlier run count as applied.
    for info in state.plugins.list() {
        if dir.join(format!("{}.wasm", info.spec.name)).exists() {
            if let Ok(Some((_, manifest))) = read_pair(&dir, &info.spec.name) {
                applied.insert(info.spec.name.clone(), (info.component_sha256, manifest));
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

async fn scan(
    state: &Arc<BrokerState>,
    dir: &Path,
    applied: &mut HashMap<String, (String, Manifest)>,
) {
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
        if applied
            .get(name)
            .is_some_and(|(s, m)| *s == sha && *m == manifest)
        {
            continue;
        }
        let spec = manifest.clone().into_spec(name.clone());
        match PluginManager::deploy(state, spec, bytes).await {
            Ok(done) => {
                tracing::info!(plugin = %name, version = done.version, upgraded = done.upgraded, "deployed from the plugin directory");
                applied.insert(name.clone(), (sha, manifest));
            }
            Err(e) => {
                tracing::warn!(plugin = %name, error = %e, "plugin directory deploy refused");
                // Remember the refusal so it is not retried until the files change.
                applied.insert(name.clone(), (sha, manifest));
            }
        }
    }
    let gone: Vec<String> = applied
        .keys()
        .filter(|n| !present.contains(n))
        .cloned()
        .collect();
    for name in gone {
        applied.remove(&name);
        match PluginManager::remove(state, &name).await {
            Ok(()) => tracing::info!(plugin = %name, "removed: its file left the plugin directory"),
            Err(e) => {
                tracing::warn!(plugin = %name, error = %e, "removing a plugin whose file was deleted failed")
            }
        }
    }
}
