#!/usr/bin/env bash
# Produce throughput with idempotence on (the default) and off, in the same
# run: PAIRS pairs of `msmq bench produce --producers 4` runs of COUNT
# messages of 1 KiB in batches of 100, the two settings alternating (off,
# on, off, on, ...), each on a fresh release-build broker in a temporary
# directory on a loopback port. Prints every run's JSON, then the median
# rate and p99 of each setting and the median of the on/off ratio within a
# pair.
#
#   scripts/bench-idempotence.sh                  # PAIRS=5 COUNT=500000
#   WRITE_DOCS=1 scripts/bench-idempotence.sh     # also writes its section
#                                                 # of docs/benchmarks.md
set -euo pipefail
cd "$(dirname "$0")/.."

PAIRS=${PAIRS:-5}
COUNT=${COUNT:-500000}
if [ "${BUILD:-1}" != 0 ]; then
  cargo build --release --quiet --bin msmq
fi
MSMQ=$PWD/target/release/msmq

WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

run_once() { # setting pair -> one JSON line, tagged with both
  local setting=$1 pair=$2 dir="$WORK/$1-$2" flag=()
  [ "$setting" = off ] && flag=(--no-idempotence)
  "$MSMQ" serve --listen 127.0.0.1:0 --http 127.0.0.1:0 --data-dir "$dir" --log warn >"$dir.out" 2>"$dir.err" &
  local pid=$!
  for _ in $(seq 200); do [ -s "$dir.out" ] && break; sleep 0.05; done
  MSMQ_SERVER=$(awk '{print $4; exit}' "$dir.out") MSMQ_CA=$dir/tls/cert.pem \
    MSMQ_METRICS=$(grep -o 'http://[^)]*' "$dir.out" | head -1) \
    "$MSMQ" bench produce --producers 4 --count "$COUNT" --size 1024 --batch 100 \
    --duration 300s --json "${flag[@]}" |
    tail -1 | sed "s/^{/{\"setting\":\"$setting\",\"pair\":$pair,/"
  kill -TERM "$pid"; wait "$pid" || true
  rm -rf "$dir"
}

for pair in $(seq "$PAIRS"); do
  # Which goes first alternates, so a drift of the machine favours neither.
  order="off on"
  [ $((pair % 2)) = 0 ] && order="on off"
  for setting in $order; do
    run_once "$setting" "$pair" | tee -a "$WORK/runs.jsonl"
  done
done

COMMIT=$(git rev-parse --short HEAD) WRITE_DOCS=${WRITE_DOCS:-} COUNT=$COUNT PAIRS=$PAIRS \
python3 - "$WORK/runs.jsonl" <<'EOF'
import json, os, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
rate = {(r["setting"], r["pair"]): r["messages_per_sec"] for r in runs}
pairs = sorted({r["pair"] for r in runs})
ratios = [rate[("on", p)] / rate[("off", p)] for p in pairs if ("on", p) in rate and ("off", p) in rate]
med = lambda s, k: statistics.median(r[k] for r in runs if r["setting"] == s)
rows = {s: (med(s, "messages_per_sec"), med(s, "p99_ms")) for s in ("off", "on")}
ratio = statistics.median(ratios)
print()
for s in ("off", "on"):
    print(f"idempotence {s:<3}  {rows[s][0]:>10,.0f} msg/s  p99 {rows[s][1]:.1f} ms")
print(f"on / off (median of {len(ratios)} pairs): {ratio:.3f}  (pairs: {', '.join(f'{r:.3f}' for r in ratios)})")
if os.environ.get("WRITE_DOCS"):
    section = [
        "## Idempotent producers: the cost",
        "",
        "Written by `scripts/bench-idempotence.sh` (commit "
        f"`{os.environ['COMMIT']}`): `bench produce --producers 4 --batch 100 --size 1024 "
        f"--count {int(os.environ['COUNT']):,}` on a fresh broker, idempotence off "
        "(`--no-idempotence`) and on (the default) alternating (which goes first alternates too), "
        f"{os.environ['PAIRS']} pairs. Rates and p99 are medians; the ratio is the median "
        "of the on/off ratios within a pair. With idempotence on, each request also reads "
        "and rewrites its producer's record (about 100 bytes plus the placement of its "
        "last 5 replies) in the commit that stores it.",
        "",
        "| idempotence | msg/s | p99 |",
        "| --- | --- | --- |",
        f"| off | {rows['off'][0]:,.0f} | {rows['off'][1]:.1f} ms |",
        f"| on | {rows['on'][0]:,.0f} | {rows['on'][1]:.1f} ms |",
        "",
        f"On is **{ratio:.2f}x** of off (pairs: {', '.join(f'{r:.2f}' for r in ratios)}).",
    ]
    import subprocess
    subprocess.run([sys.executable, "scripts/docs_section.py", "idempotence", "docs/benchmarks.md"],
                   input="\n".join(section), text=True, check=True)
EOF
