#!/usr/bin/env bash
# Abuse benchmark: well-behaved producers alone, then beside flooding clients,
# in alternating phases of one run (`msmq bench abuse`), RUNS times (default
# 3) against a fresh release-build broker with authentication on. The
# flooders authenticate as their own principal, ignore RATE_LIMITED and
# reconnect 100 ms after being cut off. Prints every run's JSON and the
# median ratio of the producers' throughput beside the flood to alone.
#
# The request-rate limits are sized to the machine: the default per-principal
# limit (100,000 requests/s) is more than a 2-core machine serves, so a flood
# under it would not count as abuse. PRINCIPAL_RATE (default 10000) is about a
# fifth of what 2 cores answer.
#
#   scripts/bench-abuse.sh          # RUNS=3 PHASE=5s ROUNDS=3 FLOODERS=4
#   ATTACK=hold scripts/bench-abuse.sh   # release defaults for memory
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
PHASE=${PHASE:-5s}
ROUNDS=${ROUNDS:-3}
FLOODERS=${FLOODERS:-4}
ATTACK=${ATTACK:-flood}
HOLDERS=${HOLDERS:-256}
PRINCIPAL_RATE=${PRINCIPAL_RATE:-10000}
# The hold attack runs against the broker's defaults, rate limits included.
RATE_ARGS=(--requests-per-sec-per-principal-max "$PRINCIPAL_RATE")
if [ "$ATTACK" = hold ]; then RATE_ARGS=(); fi
cargo build --release --quiet
MSMQ=$PWD/target/release/msmq
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

: >"$WORK/ratios"
for run in $(seq "$RUNS"); do
  dir=$WORK/run$run
  "$MSMQ" serve --listen 127.0.0.1:0 --http 127.0.0.1:0 --data-dir "$dir" --auth \
    "${RATE_ARGS[@]}" --log warn >"$dir.out" 2>"$dir.err" &
  pid=$!
  for _ in $(seq 2000); do [ -s "$dir.out" ] && break; sleep 0.005; done
  export MSMQ_SERVER=$(awk '{print $4; exit}' "$dir.out") MSMQ_CA=$dir/tls/cert.pem
  export MSMQ_TOKEN=$(cat "$dir/admin.token")
  flood_token=$("$MSMQ" token create flood 2>/dev/null)
  MSMQ_FLOOD_TOKEN=$flood_token "$MSMQ" bench abuse --duration "$PHASE" --rounds "$ROUNDS" \
    --flooders "$FLOODERS" --attack "$ATTACK" --holders "$HOLDERS" --broker-pid "$pid" \
    --json | tee -a "$WORK/runs.json"
  sed -E 's/.*"median_ratio":([0-9.e+-]+).*/\1/' <"$WORK/runs.json" | tail -1 >>"$WORK/ratios"
  grep -c "cut off" "$dir.err" | sed 's/^/connections cut off (broker log): /' || true
  awk '/VmHWM/ {printf "broker peak RSS: %d MiB\n", $2 / 1024}' "/proc/$pid/status"
  kill -TERM "$pid"; wait "$pid" || true
done
echo "median ratio over $RUNS runs: $(sort -g "$WORK/ratios" | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')"
