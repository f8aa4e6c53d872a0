#!/usr/bin/env bash
# Builds the JavaScript consumer plugins into WebAssembly components.
#
#   plugins/js/build.sh [NAME...]
#
# Every folder plugins/js/NAME/ with an index.js is one plugin; it becomes
# plugins/js/target/NAME.wasm (all of them when no NAME is given; a NAME may
# also be a deeper folder such as testing/thrower, built to
# target/thrower.wasm). Steps:
#   1. installs componentize-js and preview2-shim, pinned in
#      package-lock.json, into plugins/js/node_modules with `npm ci` when
#      they are missing or other versions (so re-running is cheap);
#   2. componentize-js builds NAME/index.js against the repository's wit/
#      package, world `packed-consumer` (batches field by field), with its
#      default features (console output goes to the broker's log);
#   3. `msmq plugin check` verifies that the component imports nothing the
#      broker refuses. msmq is $MSMQ, else `msmq` on PATH, else the newer of
#      the repository's target/release/msmq and target/debug/msmq.
#
# COMPONENTIZE_DISABLE="stdio random clocks http fetch-event" turns features
# off (componentize-js -d), for a broker that links no WASI at all.
set -euo pipefail

COMPONENTIZE_JS_VERSION=0.23.0
PREVIEW2_SHIM_VERSION=0.17.9

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
# The WIT package: $WIT_DIR, else a wit/ folder beside this script (a plugin
# made by `msmq plugin new --lang js`), else the repository's.
if [ -n "${WIT_DIR:-}" ]; then
  wit="$WIT_DIR"
elif [ -f "$here/wit/plugin.wit" ]; then
  wit="$here/wit"
else
  wit="$repo/wit"
fi
out="$here/target"

say() { echo "build.sh: $*" >&2; }
die() { say "error: $*"; exit 1; }

command -v node >/dev/null 2>&1 || die "node not found (Node.js 18 or later is needed)"
command -v npm >/dev/null 2>&1 || die "npm not found (it comes with Node.js)"

# ------------------------------------------------------------ componentize --

cjs_dir="$here/node_modules/@bytecodealliance/componentize-js"
# componentize-js loads preview2-shim at build time without declaring it.
shim_dir="$here/node_modules/@bytecodealliance/preview2-shim"
installed_version() {
  node -e 'try { console.log(require(process.argv[1]).version) } catch { }' "$1/package.json"
}
installed() {
  [ "$(installed_version "$cjs_dir")" = "$COMPONENTIZE_JS_VERSION" ] &&
    [ "$(installed_version "$shim_dir")" = "$PREVIEW2_SHIM_VERSION" ]
}
if ! installed; then
  say "installing componentize-js $COMPONENTIZE_JS_VERSION (npm ci)"
  (cd "$here" && npm ci --no-audit --no-fund --loglevel=error) ||
    die "npm ci failed in plugins/js"
  installed || die "package-lock.json does not pin componentize-js $COMPONENTIZE_JS_VERSION" \
    "and preview2-shim $PREVIEW2_SHIM_VERSION"
fi

# ------------------------------------------------------------------- msmq --

find_msmq() {
  if [ -n "${MSMQ:-}" ]; then echo "$MSMQ"; return 0; fi
  if command -v msmq >/dev/null 2>&1; then command -v msmq; return 0; fi
  local rel="$repo/target/release/msmq" dbg="$repo/target/debug/msmq"
  if [ -x "$rel" ] && [ -x "$dbg" ]; then
    # Prefer the fresher build: its import rules are the current ones.
    if [ "$dbg" -nt "$rel" ]; then echo "$dbg"; else echo "$rel"; fi
    return 0
  fi
  [ -x "$rel" ] && { echo "$rel"; return 0; }
  [ -x "$dbg" ] && { echo "$dbg"; return 0; }
  return 1
}
msmq="$(find_msmq)" || die "msmq not found, so the component's imports cannot be checked.
  Build it with \`cargo build --release --bin msmq\` at the repository root,
  or point MSMQ at an msmq binary."
"$msmq" plugin check --help >/dev/null 2>&1 ||
  die "$msmq has no \`plugin check\` command (an older build): rebuild it with
  \`cargo build --release --bin msmq\` at the repository root, or point MSMQ at a newer one."

# ---------------------------------------------------------------- plugins --

if [ $# -gt 0 ]; then
  names=("$@")
else
  names=()
  for d in "$here"/*/; do
    n="$(basename "$d")"
    [ "$n" = node_modules ] || [ "$n" = target ] && continue
    [ -f "$d/index.js" ] && names+=("$n")
  done
fi
[ ${#names[@]} -gt 0 ] || die "no plugin folders (NAME/index.js) in plugins/js"

disable=()
if [ -n "${COMPONENTIZE_DISABLE:-}" ]; then
  # shellcheck disable=SC2206 # a space-separated list on purpose
  disable=(-d $COMPONENTIZE_DISABLE)
fi

mkdir -p "$out"
for name in "${names[@]}"; do
  [ -f "$here/$name/index.js" ] || die "no plugin $name (expected plugins/js/$name/index.js)"
  base="$(basename "$name")"
  wasm="$out/$base.wasm"
  say "building $name"
  start=$(date +%s)
  # From plugins/js, so a plugin can import ../msmq-plugin.js: componentize-js
  # lets the module see the working directory's tree only.
  (cd "$here" && node "$cjs_dir/src/cli.js" "$name/index.js" \
      --wit "$wit" --world-name packed-consumer "${disable[@]}" -o "$wasm.tmp") ||
    { rm -f "$wasm.tmp"; die "componentize-js failed for $name"; }
  mv "$wasm.tmp" "$wasm"
  say "built target/$base.wasm: $(wc -c <"$wasm") bytes in $(( $(date +%s) - start ))s"

  if ! check_out="$("$msmq" plugin check "$wasm" 2>&1)"; then
    echo "$check_out" >&2
    die "target/$base.wasm would be refused by the broker (\`msmq plugin check\` above, with $msmq)"
  fi
  say "checked target/$base.wasm: $(echo "$check_out" | tail -n 1)"
done
