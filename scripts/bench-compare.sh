#!/usr/bin/env bash
# Compare two release binaries on one bench shape, in alternating pairs of
# runs (base, candidate, base, candidate, ...) so that machine noise hits
# both alike. Each run gets a fresh broker of that binary, in a temporary
# directory on a loopback port; the bench client is the same binary.
# Prints every run's JSON, each pair's ratio (candidate / base) and the
# median ratio.
#
#   scripts/bench-compare.sh BASE_BIN CANDIDATE_BIN [bench args...]
#   PAIRS=3 (default). Default bench: produce --producers 4 --batch 100
#   --size 1000 --partitions 4 --count 1000000.
#
# Build the base from another commit with, for example:
#   git worktree add /tmp/base <commit> && (cd /tmp/base && cargo build --release)
set -euo pipefail
[ $# -ge 2 ] || { sed -n 2,14p "$0"; exit 2; }
BASE=$(realpath "$1")
CANDIDATE=$(realpath "$2")
shift 2
PAIRS=${PAIRS:-3}
if [ $# -eq 0 ]; then
  set -- produce --producers 4 --batch 100 --size 1000 --partitions 4 --count 1000000
fi
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

run_once() { # binary dir -> prints the bench's JSON line
  local bin=$1 dir=$2
  shift 2
  "$bin" serve --listen 127.0.0.1:0 --http 127.0.0.1:0 --data-dir "$dir" --log warn >"$dir.out" 2>"$dir.err" &
  local pid=$!
  for _ in $(seq 200); do [ -s "$dir.out" ] && break; sleep 0.05; done
  MSMQ_SERVER=$(awk '{print $4; exit}' "$dir.out") MSMQ_CA=$dir/tls/cert.pem \
    MSMQ_METRICS=$(grep -o 'http://[^)]*' "$dir.out" | head -1) \
    "$bin" bench "$@" --duration 300s --json | tail -1
  kill -TERM "$pid"; wait "$pid" || true
  rm -rf "$dir"
}
rate() { sed -E 's/.*"messages_per_sec":([0-9.e+-]+).*/\1/'; }

: >"$WORK/ratios"
for pair in $(seq "$PAIRS"); do
  b=$(run_once "$BASE" "$WORK/base$pair" "$@")
  c=$(run_once "$CANDIDATE" "$WORK/cand$pair" "$@")
  echo "pair $pair base      $b"
  echo "pair $pair candidate $c"
  ratio=$(awk -v b="$(echo "$b" | rate)" -v c="$(echo "$c" | rate)" 'BEGIN {printf "%.3f", c / b}')
  echo "pair $pair: base $(echo "$b" | rate) msg/s, candidate $(echo "$c" | rate) msg/s, ratio $ratio"
  echo "$ratio" >>"$WORK/ratios"
done
echo "median ratio candidate/base over $PAIRS pairs: $(sort -g "$WORK/ratios" | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')"
