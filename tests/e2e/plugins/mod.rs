//! Plugin tests: real components built from `plugins/` (once per test run),
//! deployed into a real broker over QUIC.

mod exactly_once;
mod lifecycle;
mod payment;
mod quota;
mod sandbox;

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
