#!/usr/bin/env bash
# Builds Python consumer plugins into Wasm components.
#
#   ./build.sh [NAME...]     build NAME/app.py into target/NAME.wasm (default:
#                            every folder here with an app.py), then check it
#                            with `msmq plugin check`
#   ./build.sh --bindings    only generate the Python bindings into
#                            target/bindings (for editors and the tests)
#
# componentize-py is installed into .venv here on first use, at exactly the
# version below; later runs install nothing. The msmq used for the check is
# $MSMQ, else `msmq` on PATH, else the repository's target/release or
# target/debug build.
set -euo pipefail

CPY_VERSION=0.25.1

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
# The WIT package: $WIT_DIR, else a wit/ folder beside this script (a plugin
# made by `msmq plugin new --lang python`), else the repository's.
if [[ -n "${WIT_DIR:-}" ]]; then
    wit=$WIT_DIR
elif [[ -f "$here/wit/plugin.wit" ]]; then
    wit="$here/wit"
else
    wit="$repo/wit"
fi
# Batches arrive field by field (WIT `packed-batch`): lifting them costs a few
# copies instead of two Python objects per message.
world=packed-consumer
venv="$here/.venv"
cpy="$venv/bin/componentize-py"
out="$here/target"

die() { echo "build.sh: $*" >&2; exit 1; }

ensure_componentize_py() {
    if [[ -x "$cpy" ]] && [[ "$("$cpy" --version 2>/dev/null)" == "componentize-py $CPY_VERSION" ]]; then
        return
    fi
    if [[ ! -x "$venv/bin/python" ]]; then
        local py
        py=$(command -v python3 || command -v python) || die "python3 is needed to create $venv"
        echo "creating a virtualenv in .venv"
        "$py" -m venv "$venv" || die "could not create a virtualenv (on Debian: apt-get install python3-venv)"
    fi
    echo "installing componentize-py==$CPY_VERSION into .venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "componentize-py==$CPY_VERSION" \
        || die "could not install componentize-py==$CPY_VERSION from PyPI"
}

# Runs componentize-py without picking up an outer virtualenv's or PYTHONPATH's
# packages, which would otherwise be bundled into the component.
cpy() { env -u VIRTUAL_ENV -u PYTHONPATH -u PYTHONHOME "$cpy" "$@"; }

bindings() {
    rm -rf "$out/bindings"
    cpy -q -d "$wit" -w "$world" bindings "$out/bindings"
}

# The first msmq that knows `plugin check`, in the documented order.
find_msmq() {
    local candidates=() c found_any=
    if [[ -n "${MSMQ:-}" ]]; then
        candidates=("$MSMQ")
    else
        if command -v msmq >/dev/null 2>&1; then candidates+=("$(command -v msmq)"); fi
        candidates+=("$repo/target/release/msmq" "$repo/target/debug/msmq")
    fi
    for c in "${candidates[@]}"; do
        [[ -x "$c" ]] || continue
        found_any=1
        if "$c" plugin check --help >/dev/null 2>&1; then
            echo "$c"
            return
        fi
    done
    if [[ -n "$found_any" ]]; then
        die "no msmq found knows \`msmq plugin check\` (tried: ${candidates[*]}); rebuild it: cargo build --release --bin msmq (in the repository root), or point \$MSMQ at a newer one"
    fi
    die "no msmq found to check the component; build it with: cargo build --release --bin msmq (in the repository root), or set \$MSMQ"
}

build_one() {
    local name=$1 src="$here/$1" stage="$out/.stage/$1"
    [[ -f "$src/app.py" ]] || die "$src/app.py not found: a plugin is a folder with an app.py"
    # Only the app folder and the SDK go on the module path, not this folder
    # (it holds .venv and target/).
    rm -rf "$stage" && mkdir -p "$stage"
    cp "$here/msmq_plugin.py" "$stage/"
    local start=$SECONDS tmp="$out/$name.wasm.tmp"
    echo "building $name"
    cpy -q -d "$wit" -w "$world" componentize -p "$src" -p "$stage" -o "$tmp" app \
        || die "componentize-py failed for $name"
    mv "$tmp" "$out/$name.wasm"
    echo "  target/$name.wasm: $(wc -c <"$out/$name.wasm") bytes in $((SECONDS - start)) s"
    if ! "$msmq" plugin check "$out/$name.wasm"; then
        die "$name: the component imports something the broker does not link (see above); target/$name.wasm will be refused at deploy"
    fi
}

names=()
bindings_only=
for arg in "$@"; do
    case $arg in
        --bindings) bindings_only=1 ;;
        -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) die "unknown option $arg (see --help)" ;;
        *) names+=("${arg%/}") ;;
    esac
done

mkdir -p "$out"
ensure_componentize_py
bindings
if [[ -n "$bindings_only" ]]; then
    echo "bindings in target/bindings"
    exit 0
fi

if [[ ${#names[@]} -eq 0 ]]; then
    for d in "$here"/*/; do
        [[ -f "$d/app.py" ]] && names+=("$(basename "$d")")
    done
    [[ ${#names[@]} -gt 0 ]] || die "no plugin folders (NAME/app.py) found"
fi
msmq=$(find_msmq)
for name in "${names[@]}"; do
    build_one "$name"
done
