#!/usr/bin/env bash
# Adds the Rust target wasm32-wasip2 to the project's toolchain
# (rust-toolchain.toml). rustup does not add a missing target by itself where
# RUSTUP_AUTO_INSTALL=0 is set, and building the broker needs it: it embeds
# the example plugins, built for that target. A no-op when present.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=wasm32-wasip2
if ! command -v rustup >/dev/null 2>&1; then
  libdir="$(rustc --print target-libdir --target "$TARGET" 2>/dev/null || true)"
  if [ -n "$libdir" ] && ls "$libdir"/libstd-* >/dev/null 2>&1; then
    echo "install-rust-target.sh: $TARGET available (no rustup)"
    exit 0
  fi
  echo "install-rust-target.sh: error: rustup not found and the toolchain has no $TARGET target; install Rust with rustup (https://rustup.rs) or add the target to your toolchain" >&2
  exit 1
fi
rustup target add "$TARGET"
