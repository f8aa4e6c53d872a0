#!/usr/bin/env bash
# The scale run of the performance issue, for one or more release binaries
# in turn: produce a backlog of COUNT (default 10,000,000) 1,000-byte
# messages with 4 producers on a fresh broker, report the broker's peak
# resident memory, the redb file beside the segment files, the time a
# restart after `kill -9` takes to listen again, and a cold single-consumer
# drain (2,000-message polls) after dropping the page cache when allowed.
# Needs about COUNT KiB of free disk per binary; the data directory is
# deleted after each binary.
#
#   scripts/bench-scale.sh BIN [BIN...]     # COUNT=10000000 DIR=$TMPDIR
set -euo pipefail
[ $# -ge 1 ] || { sed -n 2,11p "$0"; exit 2; }
COUNT=${COUNT:-10000000}
PARENT=${DIR:-${TMPDIR:-/tmp}}
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT

start() { # bin dir -> PID, MSMQ_SERVER, MSMQ_CA, MSMQ_METRICS, LISTEN_S (seconds to listen)
  local t0=$(date +%s.%N)
  "$1" serve --listen 127.0.0.1:0 --http 127.0.0.1:0 --data-dir "$2" --log warn >"$2.out" 2>"$2.err" &
  PID=$!
  for _ in $(seq 12000); do [ -s "$2.out" ] && break; sleep 0.005; done
  LISTEN_S=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.2f", b - a}')
  export MSMQ_SERVER=$(awk '{print $4; exit}' "$2.out") MSMQ_CA=$2/tls/cert.pem
  export MSMQ_METRICS=$(grep -o 'http://[^)]*' "$2.out" | head -1)
}
peak_rss_mib() { awk '/VmHWM/ {printf "%.0f", $2 / 1024}' "/proc/$PID/status"; }

for bin in "$@"; do
  bin=$(realpath "$bin")
  dir=$(mktemp -d "$PARENT/msmq-scale.XXXXXX")/data
  start "$bin" "$dir"
  "$bin" bench produce --producers 4 --partitions 4 --size 1000 --batch 100 \
    --count "$COUNT" --topic scale --duration 1200s --json | tail -1 >"$dir.produce"
  rss_produce=$(peak_rss_mib)
  redb=$(du -b "$dir/msmq.redb" | cut -f1)
  segments=$(du -sb "$dir/segments" | cut -f1)
  kill -9 "$PID"; wait "$PID" 2>/dev/null || true
  start "$bin" "$dir"
  restart=$LISTEN_S
  sync
  cold="page cache kept"
  if echo 3 2>/dev/null >/proc/sys/vm/drop_caches; then cold="page cache dropped"; fi
  "$bin" bench consume --no-prefill --topic scale --consumers 1 --max-messages 2000 \
    --size 1000 --count "$COUNT" --duration 1200s --json | tail -1 >"$dir.drain"
  rss_after=$(peak_rss_mib)
  kill -TERM "$PID"; wait "$PID" || true
  python3 - "$bin" "$dir" "$rss_produce" "$rss_after" "$redb" "$segments" "$restart" "$cold" <<'PY'
import json, sys
bin, d, rss_produce, rss_after, redb, segments, restart, cold = sys.argv[1:]
produce = json.load(open(d + ".produce"))
drain = json.load(open(d + ".drain"))
print(json.dumps({
    "binary": bin,
    "produce_messages_per_sec": round(produce["messages_per_sec"]),
    "produce_p99_ms": produce["p99_ms"],
    "write_amplification": produce.get("write_amplification"),
    "broker_peak_rss_mib_after_produce": int(rss_produce),
    "broker_peak_rss_mib_after_drain": int(rss_after),
    "redb_bytes": int(redb),
    "segment_bytes": int(segments),
    "index_to_log": int(redb) / max(int(segments), 1),
    "restart_after_kill9_s": float(restart),
    "cold_drain_messages_per_sec": round(drain["messages_per_sec"]),
    "cold_drain": cold,
}))
PY
  rm -rf "$(dirname "$dir")"
done
