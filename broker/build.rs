//! Builds the example plugins (`plugins/examples`: billing, points,
//! notification) for `wasm32-wasip2` and leaves the components in `OUT_DIR`,
//! where `msmq demo` embeds them: the demo then needs nothing but the binary.
//!
//! The components are built with the same cargo and rustc as the broker, into
//! `plugins/target` (where the tests and the README's plugin command build
//! them too, so a second build is a no-op).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const PLUGIN_TARGET: &str = "wasm32-wasip2";
/// (cargo package, component file) of the components `msmq demo` deploys.
const DEMO_PLUGINS: [(&str, &str); 3] = [
    ("billing", "billing.wasm"),
    ("points", "points.wasm"),
    ("notification", "notification.wasm"),
];

fn main() {
    if let Err(message) = build() {
        eprintln!("error: {message}");
        std::process::exit(1);
    }
}

fn build() -> Result<(), String> {
    let manifest_dir = PathBuf::from(env("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir
        .parent()
        .ok_or("broker/ has no parent directory")?;
    let plugins = root.join("plugins");
    let out_dir = PathBuf::from(env("OUT_DIR")?);
    for watched in [
        "plugins/examples",
        "plugins/Cargo.toml",
        "plugins/Cargo.lock",
        "sdk/plugin",
        "wit",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    println!("cargo:rerun-if-env-changed=RUSTUP_TOOLCHAIN");

    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    ensure_target_installed(&rustc)?;

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target_dir = plugins.join("target");
    let mut command = Command::new(cargo);
    command
        .args([
            "build",
            "--release",
            "--quiet",
            "--locked",
            "--target",
            PLUGIN_TARGET,
        ])
        .arg("--manifest-path")
        .arg(plugins.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        // A build-dir shared with the outer build (a user's cargo config
        // may set one) would wait forever on the outer build's lock.
        .env("CARGO_BUILD_BUILD_DIR", &target_dir);
    for (package, _) in DEMO_PLUGINS {
        command.args(["--package", package]);
    }
    // What the outer build was given for the host (its rustflags, clippy as
    // a wrapper, a cross target) must not leak into the wasm build.
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_RUSTFLAGS",
    ] {
        command.env_remove(var);
    }
    for (var, _) in std::env::vars_os() {
        let name = var.to_string_lossy();
        if name.starts_with("CARGO_FEATURE_") || name.starts_with("CARGO_CFG_") {
            command.env_remove(&var);
        }
    }
    // Cargo reads build script stdout for directives: send the nested
    // build's output to stderr, which cargo shows when the build fails.
    command.stdout(Stdio::from(std::io::stderr()));
    let status = command
        .status()
        .map_err(|e| format!("running cargo to build the example plugins: {e}"))?;
    if !status.success() {
        return Err(format!(
            "building the example plugins for {PLUGIN_TARGET} failed ({status}); \
             the output above says why"
        ));
    }
    let built = target_dir.join(PLUGIN_TARGET).join("release");
    for (_, file) in DEMO_PLUGINS {
        let from = built.join(file);
        std::fs::copy(&from, out_dir.join(file))
            .map_err(|e| format!("copying {}: {e}", from.display()))?;
    }
    Ok(())
}

fn env(name: &str) -> Result<String, String> {
    std::env::var(name).map_err(|_| format!("cargo did not set {name}"))
}

/// A missing target fails deep inside the nested build with "can't find
/// crate for std"; say what to do instead.
fn ensure_target_installed(rustc: &str) -> Result<(), String> {
    let output = Command::new(rustc)
        .args(["--print", "target-libdir", "--target", PLUGIN_TARGET])
        .output()
        .map_err(|e| format!("running {rustc}: {e}"))?;
    let libdir = String::from_utf8_lossy(&output.stdout).trim().to_string();
    let has_std = output.status.success()
        && std::fs::read_dir(Path::new(&libdir)).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("libstd-"))
        });
    if has_std {
        Ok(())
    } else {
        Err(format!(
            "the Rust target {PLUGIN_TARGET} is not installed, and the broker embeds the \
             example plugins built for it (msmq demo); install it with \
             `rustup target add {PLUGIN_TARGET}` (the README's run and test commands do)"
        ))
    }
}
