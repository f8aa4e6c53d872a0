#!/usr/bin/env bash
# Unit tests of the Python, JavaScript and Go plugin SDKs and examples,
# outside the broker: each runs the plugins against an in-memory host that
# commits or rolls back like the broker's. The e2e suite runs the same
# plugins in a real broker. Installs each language's pinned toolchain first
# (its build.sh does, when missing); needs a built msmq for the JavaScript
# tests' `msmq plugin check` ($MSMQ, or the debug build in cargo's target
# directory).
set -euo pipefail
cd "$(dirname "$0")/.."
# The msmq that `cargo test` built, wherever CARGO_TARGET_DIR puts it.
target_dir=$(cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
export MSMQ="${MSMQ:-$target_dir/debug/msmq}"
[ -x "$MSMQ" ] || { echo "test-plugin-sdks.sh: $MSMQ not found; run cargo build --bin msmq first" >&2; exit 1; }

echo "test-plugin-sdks.sh: Python"
(cd plugins/python && bash build.sh --bindings && python3 -m unittest discover -s tests)

echo "test-plugin-sdks.sh: Go"
bash plugins/go/build.sh billing
(cd plugins/go && GOTOOLCHAIN=local GOPROXY=off GOFLAGS= GOWORK=off .venv/bin/go test ./...)

echo "test-plugin-sdks.sh: JavaScript"
(cd plugins/js && npm test)
