#!/usr/bin/env bash
# Soak: a bounded steady load (producers at a fixed rate, a consumer group
# draining it, 1 KiB messages, topic retention so the data set is steady)
# against a fresh release-build broker for DURATION (default 10m). Every
# EVERY (default 10s) it records received messages/s and the interval's
# latency percentiles (`msmq bench e2e --report-every`), and the broker's RSS
# and storage on disk (the redb file plus the log's segment files). Prints a table over time and the change from the run
# after its warm-up (its first fifth, which fills the retention window) to
# its last three tenths (medians of the intervals): flat means no growth
# trend.
#
#   scripts/soak.sh        # DURATION=10m RATE=2500 PRODUCERS=2 RETENTION=30s
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10m}
EVERY=${EVERY:-10}
RATE=${RATE:-2500}
PRODUCERS=${PRODUCERS:-2}
RETENTION=${RETENTION:-30s}
cargo build --release --quiet
MSMQ=$PWD/target/release/msmq
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

dir=$WORK/data
"$MSMQ" serve --listen 127.0.0.1:0 --http 127.0.0.1:0 --data-dir "$dir" --log warn >"$WORK/out" 2>"$WORK/err" &
pid=$!
for _ in $(seq 2000); do [ -s "$WORK/out" ] && break; sleep 0.005; done
export MSMQ_SERVER=$(awk '{print $4; exit}' "$WORK/out") MSMQ_CA=$dir/tls/cert.pem
"$MSMQ" topic create soak --partitions 4 >/dev/null
"$MSMQ" topic retention soak --max-age "$RETENTION" >/dev/null

started=$(date +%s.%N)
(
  while kill -0 "$pid" 2>/dev/null; do
    sleep "$EVERY"
    now=$(date +%s.%N)
    rss_kib=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    file_bytes=$(find "$dir/msmq.redb" "$dir/segments" -type f -printf '%s\n' 2>/dev/null | awk '{s += $1} END {print s + 0}')
    at_s=$(awk -v a="$now" -v b="$started" 'BEGIN {printf "%.1f", a - b}')
    echo "{\"at_s\": $at_s, \"rss_kib\": $rss_kib, \"file_bytes\": $file_bytes}"
  done
) >"$WORK/samples" &
"$MSMQ" bench e2e --topic soak --producers "$PRODUCERS" --consumers 1 --rate "$RATE" --batch 50 \
  --duration "$DURATION" --count 1000000000 --report-every "${EVERY}s" --json >"$WORK/intervals"

python3 - "$WORK/intervals" "$WORK/samples" "$DURATION" "$RATE" "$PRODUCERS" "$RETENTION" <<'PY'
import json, statistics, sys
intervals_file, samples_file, duration, rate, producers, retention = sys.argv[1:]
rows = [json.loads(l) for l in open(intervals_file) if l.startswith('{"interval_end_s"')]
summary = [json.loads(l) for l in open(intervals_file) if l.startswith('{') and '"bench"' in l]
samples = [json.loads(l) for l in open(samples_file) if l.strip()]
def nearest(t):
    return min(samples, key=lambda s: abs(s["at_s"] - t)) if samples else {"rss_kib": 0, "file_bytes": 0}
print(f"soak: {duration}, {producers} producers x {rate} msg/s, 1 KiB, retention {retention}")
print("| t (s) | received msg/s | p50 ms | p99 ms | max ms | RSS MiB | disk MiB |")
print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
table = []
for r in rows:
    s = nearest(r["interval_end_s"])
    row = (r["interval_end_s"], r["messages_per_sec"], r["p50_ms"], r["p99_ms"], r["max_ms"],
           s["rss_kib"] / 1024, s["file_bytes"] / 2**20)
    table.append(row)
    print("| %.0f | %.0f | %.2f | %.2f | %.2f | %.1f | %.1f |" % row)
if len(table) >= 10:
    # The first fifth fills the retention window (warm-up); compare the next
    # three tenths of the run with its last three tenths.
    n = len(table)
    early, late = table[n // 5 : n // 2], table[-(3 * n // 10):]
    # Medians, so one slow interval (a page-cache flush) does not read as a trend.
    median = lambda rs, i: statistics.median(r[i] for r in rs)
    for name, i in [("received msg/s", 1), ("p99 ms", 3), ("RSS MiB", 5), ("disk MiB", 6)]:
        a, b = median(early, i), median(late, i)
        print(f"{name}: after warm-up {a:.2f}, at the end {b:.2f}, change {100 * (b - a) / a if a else 0:+.1f}%")
if summary:
    s = summary[-1]
    print(f"whole run: {s['messages']} received, p50 {s['p50_ms']:.2f} ms, p99 {s['p99_ms']:.2f} ms, max {s['max_ms']:.2f} ms")
PY
kill -TERM "$pid"; wait "$pid" || true
