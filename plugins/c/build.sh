#!/usr/bin/env bash
# Builds the C consumer plugins into WebAssembly components.
#
#   plugins/c/build.sh [NAME...]
#
# Every folder plugins/c/NAME/ holding .c files is one plugin; it becomes
# plugins/c/target/NAME.wasm (all of them when no NAME is given). Steps:
#   1. `wit-bindgen c` turns the wit/ package (world `consumer`)
#      into consumer.h / consumer.c / consumer_component_type.o under
#      plugins/c/target/bindings/ (generated, never committed);
#   2. clang compiles the plugin and the bindings for wasm32 against wasi-libc's
#      headers;
#   3. wasm-component-ld links them (with wasm-ld, wasi-libc's malloc and string
#      functions and compiler-rt's builtins) into a core module and wraps it
#      into a component, using the component type that wit-bindgen embedded.
#      `--wasi-adapter none` makes any use of WASI (stdio, files, clocks...) a
#      link error: the broker grants plugins no WASI.
#
# Tools (plugins/c/install-tools.sh installs them on Debian 12) can be
# overridden with the environment variables CLANG, WASM_LD, WIT_BINDGEN,
# WASM_COMPONENT_LD and WASI_SYSROOT (default /usr, Debian's wasi-libc layout:
# $WASI_SYSROOT/include/wasm32-wasi, $WASI_SYSROOT/lib/wasm32-wasi).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# The WIT package: $WIT_DIR, else a wit/ folder beside this script (a plugin
# made by `msmq plugin new --lang c`), else the repository's.
if [ -n "${WIT_DIR:-}" ]; then
  wit_dir="$WIT_DIR"
elif [ -f "$here/wit/plugin.wit" ]; then
  wit_dir="$here/wit"
else
  wit_dir="$(cd "$here/../.." && pwd)/wit"
fi
out="$here/target"
bindings="$out/bindings"

# The generator version the Rust guests use too (wit-bindgen 0.57.1).
WIT_BINDGEN_VERSION=0.57.1
WIT_BINDGEN_INSTALL="cargo install wit-bindgen-cli --version $WIT_BINDGEN_VERSION --locked --no-default-features --features c"
APT_INSTALL="apt-get install -y --no-install-recommends clang lld wasi-libc libclang-rt-14-dev-wasm32"

say() { echo "build.sh: $*" >&2; }
die() { say "error: $*"; exit 1; }
missing() {
  die "$1 not found. Install it with: $2
  (or run plugins/c/install-tools.sh, which installs every tool this script needs)"
}

# first_tool CANDIDATE... : prints the first candidate that is an executable
# (a path) or a command on PATH.
first_tool() {
  local c
  for c in "$@"; do
    [ -n "$c" ] || continue
    if [[ "$c" == */* ]]; then
      if [ -x "$c" ]; then echo "$c"; return 0; fi
    elif command -v "$c" >/dev/null 2>&1; then
      command -v "$c"; return 0
    fi
  done
  return 1
}

# ---------------------------------------------------------------- tools ---

clang_bin="$(first_tool "${CLANG:-}" clang clang-14)" ||
  missing "clang (C compiler with the wasm32 target)" "$APT_INSTALL"

wasm_ld="$(first_tool "${WASM_LD:-}" wasm-ld wasm-ld-14)" ||
  missing "wasm-ld (LLVM's WebAssembly linker, Debian package lld)" "$APT_INSTALL"

wasi_sysroot="${WASI_SYSROOT:-/usr}"
wasi_inc="$wasi_sysroot/include/wasm32-wasi"
wasi_lib="$wasi_sysroot/lib/wasm32-wasi"
[ -f "$wasi_inc/stdlib.h" ] && [ -f "$wasi_lib/libc.a" ] ||
  missing "wasi-libc (expected $wasi_inc/stdlib.h and $wasi_lib/libc.a)" "$APT_INSTALL"

builtins="$("$clang_bin" --target=wasm32-wasi -print-libgcc-file-name)"
[ -f "$builtins" ] ||
  missing "compiler-rt builtins for wasm32 ($builtins)" "$APT_INSTALL"

wit_bindgen="$(first_tool "${WIT_BINDGEN:-}" wit-bindgen "${CARGO_HOME:-$HOME/.cargo}/bin/wit-bindgen")" ||
  missing "wit-bindgen (crate wit-bindgen-cli)" "$WIT_BINDGEN_INSTALL"
wit_bindgen_version="$("$wit_bindgen" --version 2>/dev/null || true)"
case "$wit_bindgen_version" in
  *" $WIT_BINDGEN_VERSION"*) ;;
  *) say "warning: $wit_bindgen is '$wit_bindgen_version', expected $WIT_BINDGEN_VERSION ($WIT_BINDGEN_INSTALL)" ;;
esac

# wasm-component-ld ships with the Rust toolchain (rustc >= 1.82, used for the
# wasm32-wasip2 target); it is also a crates.io package.
rust_component_ld=""
if command -v rustc >/dev/null 2>&1; then
  rust_host="$(rustc -vV | sed -n 's/^host: //p')"
  rust_component_ld="$(rustc --print sysroot)/lib/rustlib/$rust_host/bin/wasm-component-ld"
fi
component_ld="$(first_tool "${WASM_COMPONENT_LD:-}" wasm-component-ld "$rust_component_ld")" ||
  missing "wasm-component-ld (part of the Rust toolchain)" \
    "rustup toolchain install stable, or: cargo install wasm-component-ld --locked"

[ -f "$wit_dir/plugin.wit" ] || die "no WIT package at $wit_dir"

# -------------------------------------------------------------- plugins ---

if [ "$#" -gt 0 ]; then
  plugins=("$@")
else
  plugins=()
  for dir in "$here"/*/; do
    name="$(basename "$dir")"
    [ "$name" = target ] || [ "$name" = wit ] && continue
    compgen -G "$dir*.c" >/dev/null && plugins+=("$name")
  done
fi
[ "${#plugins[@]}" -gt 0 ] || die "no plugin folders with .c files under $here"

# ------------------------------------------------------------- bindings ---

mkdir -p "$out"
# Generate into a fresh folder, then swap it in: a failed run leaves no mix of
# old and new files.
rm -rf "$bindings.new"
if ! log="$("$wit_bindgen" c --world consumer --out-dir "$bindings.new" "$wit_dir" 2>&1)"; then
  echo "$log" >&2
  die "wit-bindgen c failed on $wit_dir"
fi
rm -rf "$bindings"
mv "$bindings.new" "$bindings"

# --------------------------------------------------------------- build ---

common_cflags=(
  --target=wasm32-wasi
  -Os
  -nostdlibinc -isystem "$wasi_inc" # wasi-libc only, never the host's headers
  -I "$bindings"
)

for name in "${plugins[@]}"; do
  src_dir="$here/$name"
  [ -d "$src_dir" ] || die "no plugin folder $src_dir"
  obj_dir="$out/obj/$name"
  rm -rf "$obj_dir"
  mkdir -p "$obj_dir"

  objects=()
  for src in "$src_dir"/*.c; do
    obj="$obj_dir/$(basename "${src%.c}").o"
    "$clang_bin" "${common_cflags[@]}" -std=c11 -Wall -Wextra -pedantic -c "$src" -o "$obj"
    objects+=("$obj")
  done
  # The generated bindings, compiled per plugin so each can differ in flags.
  "$clang_bin" "${common_cflags[@]}" -c "$bindings/consumer.c" -o "$obj_dir/consumer.o"
  objects+=("$obj_dir/consumer.o" "$bindings/consumer_component_type.o")

  # A reactor-style library: no entry point, no WASI; exports are the
  # functions the bindings mark with export_name. Debug info is dropped but
  # function names stay, so traps show readable backtraces.
  "$component_ld" \
    --wasm-ld-path "$wasm_ld" \
    --wasi-adapter none \
    --no-entry \
    --strip-debug \
    -L "$wasi_lib" \
    "${objects[@]}" -lc "$builtins" \
    -o "$out/$name.wasm.tmp"
  mv "$out/$name.wasm.tmp" "$out/$name.wasm"
  say "built $out/$name.wasm ($(wc -c <"$out/$name.wasm") bytes)"
done
