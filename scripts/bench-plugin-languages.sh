#!/usr/bin/env bash
# The billing plugin in each language, draining the same kind of backlog in
# the same run: COUNT transfers (`bench plugin --payload transfer`, 1000
# accounts), batches of 100, each language's documented memory setting.
# Languages take turns within each of ROUNDS rounds (rust, c, python, js,
# go, rust, c, ...), each run on a fresh release-build broker in a temporary
# directory on a loopback port, so machine noise hits all alike. Prints
# every run's JSON, then per language the median rate, its median ratio to
# Rust within a round, failed batches, recycled instances and wrong
# balances (the bench checks every balance against the transfers it sent).
#
#   scripts/bench-plugin-languages.sh     # ROUNDS=3 COUNT=100000
#   LANGS="python js" COUNT=300000 ROUNDS=1 scripts/bench-plugin-languages.sh
#   WRITE_DOCS=1 scripts/bench-plugin-languages.sh   # also writes its section
#                                                    # of docs/benchmarks.md
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
COUNT=${COUNT:-100000}
LANGS=${LANGS:-rust c python js go}
# BUILD=0 uses the binaries and components as they are.
if [ "${BUILD:-1}" != 0 ]; then
  cargo build --release --quiet --bin msmq
  cargo build --release --quiet --target wasm32-wasip2 --manifest-path plugins/Cargo.toml
fi
MSMQ=$PWD/target/release/msmq
export MSMQ

component() { # language -> path of its billing component (built if needed)
  case $1 in
    rust) echo "$PWD/plugins/target/wasm32-wasip2/release/billing.wasm" ;;
    c | python | js | go)
      [ -f "plugins/$1/target/billing.wasm" ] || bash "plugins/$1/build.sh" billing >&2
      echo "$PWD/plugins/$1/target/billing.wasm" ;;
    *) echo "unknown language $1" >&2; exit 2 ;;
  esac
}
memory() { # language -> its documented memory setting
  case $1 in js) echo "128 MiB" ;; *) echo "64 MiB" ;; esac
}

WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

run_once() { # language round -> one JSON line, tagged with both
  local lang=$1 round=$2 dir="$WORK/$1-$2" component mem
  component=$(component "$lang")
  mem=$(memory "$lang")
  "$MSMQ" serve --listen 127.0.0.1:0 --http 127.0.0.1:0 --data-dir "$dir" --log warn >"$dir.out" 2>"$dir.err" &
  local pid=$!
  for _ in $(seq 200); do [ -s "$dir.out" ] && break; sleep 0.05; done
  # The first deploy compiles; deploy once untimed so the drain measures the
  # plugin, not the compiler.
  MSMQ_SERVER=$(awk '{print $4; exit}' "$dir.out") MSMQ_CA=$dir/tls/cert.pem \
    "$MSMQ" bench plugin --component "$component" --payload transfer --count 1000 \
    --memory "$mem" --no-native --json >/dev/null
  MSMQ_SERVER=$(awk '{print $4; exit}' "$dir.out") MSMQ_CA=$dir/tls/cert.pem \
    "$MSMQ" bench plugin --component "$component" --payload transfer --count "$COUNT" \
    --memory "$mem" --no-native --duration 900s --json |
    tail -1 | sed "s/^{/{\"language\":\"$lang\",\"round\":$round,/"
  kill -TERM "$pid"; wait "$pid" || true
  rm -rf "$dir"
}

for round in $(seq "$ROUNDS"); do
  for lang in $LANGS; do
    run_once "$lang" "$round" | tee -a "$WORK/runs.jsonl"
  done
done

COMMIT=$(git rev-parse --short HEAD) WRITE_DOCS=${WRITE_DOCS:-} COUNT=$COUNT ROUNDS=$ROUNDS \
python3 - "$WORK/runs.jsonl" <<'EOF'
import json, os, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
langs = list(dict.fromkeys(r["language"] for r in runs))
rate = {(r["language"], r["round"]): r["plugin_messages_per_sec"] for r in runs}
print(f"\n{'language':<8} {'msg/s (median)':>15} {'x rust':>7} {'in call µs/batch':>17} "
      f"{'failed':>6} {'recycled':>8} {'wrong balances':>14}")
rows = []
for lang in langs:
    mine = [r for r in runs if r["language"] == lang]
    ratios = [rate[(lang, r["round"])] / rate[("rust", r["round"])]
              for r in mine if ("rust", r["round"]) in rate]
    row = dict(
        lang=lang,
        rate=statistics.median(r["plugin_messages_per_sec"] for r in mine),
        ratio=statistics.median(ratios) if ratios else float("nan"),
        in_call=statistics.median(r["per_batch_in_call_us"] for r in mine),
        per_batch=statistics.median(r["per_batch_us"] for r in mine),
        failed=sum(r["failed_batches"] for r in mine),
        recycled=sum(r["instances_recycled"] for r in mine),
        wrong=sum(r.get("balances_wrong", -1) for r in mine),
        memory=max(r["plugin_memory_bytes"] for r in mine),
        memory_max=mine[0]["memory_bytes_max"],
    )
    rows.append(row)
    print(f"{lang:<8} {row['rate']:>15,.0f} {row['ratio']:>7.2f} {row['in_call']:>17,.0f} "
          f"{row['failed']:>6} {row['recycled']:>8} {row['wrong']:>14}")

if os.environ.get("WRITE_DOCS"):
    names = {"rust": "Rust", "c": "C", "python": "Python", "js": "JavaScript", "go": "Go"}
    mib = lambda b: f"{b / 1048576:.0f} MiB" if b >= 1048576 else f"{b / 1024:.0f} KiB"
    section = [
        "## Billing plugin by language",
        "",
        "Written by `scripts/bench-plugin-languages.sh` (commit "
        f"`{os.environ['COMMIT']}`): each language's billing plugin drains "
        f"{int(os.environ['COUNT']):,} transfers (`bench plugin --payload transfer`, 1000 "
        "accounts, batches of 100) on a fresh broker; the languages take turns in each of "
        f"{os.environ['ROUNDS']} rounds. Rates are medians; the ratio to Rust is the median "
        "of the ratios within a round. The bench checks every balance against the "
        "transfers it sent. Where the time goes, and what was done about it: "
        "`plugins/README.md`, *Speed by language*.",
        "",
        "| language | msg/s | x Rust | time in the plugin per batch | wall time per batch | "
        "memory (limit) | failed batches | instances recycled | wrong balances |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        section.append(
            f"| {names.get(r['lang'], r['lang'])} | {r['rate']:,.0f} | {r['ratio']:.2f} | "
            f"{r['in_call'] / 1000:.2f} ms | {r['per_batch'] / 1000:.2f} ms | "
            f"{mib(r['memory'])} ({mib(r['memory_max'])}) | {r['failed']} | {r['recycled']} | "
            f"{r['wrong']} |")
    import subprocess
    subprocess.run([sys.executable, "scripts/docs_section.py", "plugin-languages", "docs/benchmarks.md"],
                   input="\n".join(section), text=True, check=True)
EOF
