#!/usr/bin/env bash
# Installs the tools plugins/c/build.sh needs, on Debian 12 (bookworm), for
# developers and CI alike. Installs only what is missing; safe to run again.
#
#   - Debian packages: clang (C compiler for wasm32), lld (wasm-ld),
#     wasi-libc (headers, malloc and string functions for wasm32),
#     libclang-rt-14-dev-wasm32 (compiler-rt builtins for wasm32);
#   - crates.io: wit-bindgen-cli (the `wit-bindgen c` bindings generator),
#     built with the C generator only;
#   - wasm-component-ld comes with the Rust toolchain; only if it is missing
#     there is it installed from crates.io.
#
# Needs root (or sudo) for apt-get, and cargo (the project's Rust toolchain).
set -euo pipefail

WIT_BINDGEN_VERSION=0.57.1 # keep in step with build.sh and the Rust guests
APT_PACKAGES=(clang lld wasi-libc libclang-rt-14-dev-wasm32)

say() { echo "install-tools.sh: $*"; }
die() { echo "install-tools.sh: error: $*" >&2; exit 1; }

# ----------------------------------------------------------------- apt ---

bash "$(dirname "$0")/../../scripts/apt-install.sh" "${APT_PACKAGES[@]}"

# --------------------------------------------------------------- cargo ---

command -v cargo >/dev/null 2>&1 ||
  die "cargo not found: install the project's Rust toolchain first (see rust-toolchain.toml)"
cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"

# wit-bindgen: the exact version, C generator only (the other generators and
# their dependencies would more than double the build time).
wit_bindgen=""
if command -v wit-bindgen >/dev/null 2>&1; then
  wit_bindgen="$(command -v wit-bindgen)"
elif [ -x "$cargo_bin/wit-bindgen" ]; then
  wit_bindgen="$cargo_bin/wit-bindgen"
fi
installed="$([ -n "$wit_bindgen" ] && "$wit_bindgen" --version 2>/dev/null || true)"
case "$installed" in
  *" $WIT_BINDGEN_VERSION") say "$installed already installed ($wit_bindgen)" ;;
  *)
    [ -n "$installed" ] && say "found '$installed', want $WIT_BINDGEN_VERSION"
    cmd=(cargo install wit-bindgen-cli --version "$WIT_BINDGEN_VERSION" --locked
      --no-default-features --features c)
    say "running: ${cmd[*]}"
    "${cmd[@]}"
    ;;
esac

# wasm-component-ld: in the Rust toolchain's sysroot since rustc 1.82.
component_ld=""
if command -v rustc >/dev/null 2>&1; then
  host="$(rustc -vV | sed -n 's/^host: //p')"
  candidate="$(rustc --print sysroot)/lib/rustlib/$host/bin/wasm-component-ld"
  [ -x "$candidate" ] && component_ld="$candidate"
fi
if [ -z "$component_ld" ] && command -v wasm-component-ld >/dev/null 2>&1; then
  component_ld="$(command -v wasm-component-ld)"
fi
if [ -n "$component_ld" ]; then
  say "wasm-component-ld already available ($component_ld)"
else
  say "running: cargo install wasm-component-ld --locked"
  cargo install wasm-component-ld --locked
fi

say "done; build with plugins/c/build.sh"
