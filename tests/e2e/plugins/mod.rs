//! Plugin tests: real components built from `plugins/` (once per test run),
//! deployed into a real broker over QUIC.

mod exactly_once;
mod languages;
mod lifecycle;
mod payment;
mod quota;
mod sandbox;
mod scaffold;

use anyhow::Context;
use msmq_client::protocol::{PluginSpec, PluginStats};
use msmq_client::Client;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("broker/ has a parent")
        .to_path_buf()
}

/// Build every Rust plugin of `plugins/` once per test process (cargo's own
/// lock makes concurrent test processes wait for one build).
pub fn rust_component(crate_name: &str) -> anyhow::Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = BUILT
        .get_or_init(|| {
            let root = repo_root();
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let target_dir = root.join("plugins").join("target");
            let status = Command::new(cargo)
                .args(["build", "--release", "--quiet", "--target", "wasm32-wasip2"])
                .arg("--manifest-path")
                .arg(root.join("plugins").join("Cargo.toml"))
                .arg("--target-dir")
                .arg(&target_dir)
                .status()
                .map_err(|e| format!("running cargo: {e}"))?;
            if !status.success() {
                return Err(format!("building the plugins failed: {status}"));
            }
            Ok(target_dir.join("wasm32-wasip2").join("release"))
        })
        .clone()
        .map_err(anyhow::Error::msg)?;
    let path = dir.join(format!("{}.wasm", crate_name.replace('-', "_")));
    anyhow::ensure!(path.exists(), "{} was not built", path.display());
    Ok(path)
}

/// Build the C plugins once (`plugins/c/build.sh`).
pub fn c_component(name: &str) -> anyhow::Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = BUILT
        .get_or_init(|| {
            let root = repo_root();
            let status = Command::new("bash")
                .arg(root.join("plugins").join("c").join("build.sh"))
                .status()
                .map_err(|e| format!("running plugins/c/build.sh: {e}"))?;
            if !status.success() {
                return Err(format!("plugins/c/build.sh failed: {status}"));
            }
            Ok(root.join("plugins").join("c").join("target"))
        })
        .clone()
        .map_err(anyhow::Error::msg)?;
    let path = dir.join(format!("{name}.wasm"));
    anyhow::ensure!(path.exists(), "{} was not built", path.display());
    Ok(path)
}

/// Build the plugins of `plugins/<language>/` once per test process with
/// their own `build.sh` (pinned toolchain, then `msmq plugin check` with
/// this build's `msmq`), and return `target/<name>.wasm`.
pub fn language_component(language: &str, name: &str) -> anyhow::Result<PathBuf> {
    static BUILT: std::sync::Mutex<Vec<(String, Result<PathBuf, String>)>> =
        std::sync::Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if !built.iter().any(|(l, _)| l == language) {
        let dir = repo_root().join("plugins").join(language);
        let result = Command::new("bash")
            .arg(dir.join("build.sh"))
            .env("MSMQ", crate::harness::MSMQ)
            .status()
            .map_err(|e| format!("running plugins/{language}/build.sh: {e}"))
            .and_then(|status| {
                if status.success() {
                    Ok(dir.join("target"))
                } else {
                    Err(format!("plugins/{language}/build.sh failed: {status}"))
                }
            });
        built.push((language.to_string(), result));
    }
    let dir = built
        .iter()
        .find(|(l, _)| l == language)
        .map(|(_, r)| r.clone())
        .expect("just built")
        .map_err(anyhow::Error::msg)?;
    let path = dir.join(format!("{name}.wasm"));
    anyhow::ensure!(path.exists(), "{} was not built", path.display());
    Ok(path)
}

/// A spec with default limits.
pub fn spec(name: &str, topic: &str) -> PluginSpec {
    PluginSpec::new(name, topic)
}

pub async fn deploy(client: &Client, spec: PluginSpec, component: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(component).with_context(|| component.display().to_string())?;
    client.deploy_plugin(spec, bytes).await?;
    Ok(())
}

/// Poll a plugin's stats until `done` holds, or fail after `timeout`.
pub async fn wait_stats(
    client: &Client,
    name: &str,
    timeout: Duration,
    done: impl Fn(&PluginStats) -> bool,
) -> anyhow::Result<PluginStats> {
    let deadline = Instant::now() + timeout;
    loop {
        let stats = client.plugin_stats(name).await?;
        if done(&stats) {
            return Ok(stats);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "plugin {name} did not get there in {timeout:?}; stats: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A plugin's committed state under `prefix`, as UTF-8 key → value.
pub async fn state(
    client: &Client,
    name: &str,
    prefix: &str,
) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    Ok(client
        .plugin_state_all(name, prefix.as_bytes())
        .await?
        .into_iter()
        .map(|e| {
            (
                String::from_utf8_lossy(&e.key).into_owned(),
                String::from_utf8_lossy(&e.value).into_owned(),
            )
        })
        .collect())
}

/// The transfer ids of the notification plugin's messages on `topic`, each
/// checked to be there once.
pub async fn notified_transfers(
    client: &Client,
    topic: &str,
) -> anyhow::Result<std::collections::BTreeSet<String>> {
    let mut notified = std::collections::BTreeSet::new();
    for m in crate::harness::read_all(client, topic, 0, 0).await? {
        let text = String::from_utf8(m.payload)?;
        let id = text
            .split(" transfer ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .ok_or_else(|| anyhow::anyhow!("unexpected notification {text:?}"))?;
        anyhow::ensure!(notified.insert(id.to_string()), "{id} notified twice");
    }
    Ok(notified)
}
