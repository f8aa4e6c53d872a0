#!/usr/bin/env bash
# Installs everything the tests need on a fresh Debian 12 machine (the C
# plugin toolchain: Debian's clang, lld and wasi-libc, and wit-bindgen from
# crates.io; for the web console test, Debian's chromium and playwright-core
# from npm; the Rust toolchain and its wasm32-wasip2 target come from
# rust-toolchain.toml), then runs every test of the workspace and the fuzz
# targets (cargo-fuzz from crates.io; see scripts/fuzz.sh). The tests build
# the example plugins from source themselves, once per run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash plugins/c/install-tools.sh
bash tests/console/install.sh
cargo test --workspace "$@"
# Every wire decoder and the filter parser under cargo-fuzz, 60 s each.
bash scripts/fuzz.sh
