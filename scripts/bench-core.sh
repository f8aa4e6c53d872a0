#!/usr/bin/env bash
# Core benchmarks of the broker (produce, single-message latency, backlog
# drain, memory with a backlog, transactions), each run RUNS times (default 3) against a
# fresh release-build broker in a temporary directory on a loopback port;
# prints every run's JSON summary and the medians.
#
#   scripts/bench-core.sh            # RUNS=3 COUNT=1000000
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
COUNT=${COUNT:-1000000}
TX_COUNT=${TX_COUNT:-200000}
cargo build --release --quiet
MSMQ=$PWD/target/release/msmq
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

start_broker() { # dir -> sets PID, ADDR
  "$MSMQ" serve --listen 127.0.0.1:0 --http 127.0.0.1:0 --data-dir "$1" --log warn >"$1.out" 2>"$1.err" &
  PID=$!
  for _ in $(seq 100); do
    [ -s "$1.out" ] && break
    sleep 0.1
  done
  ADDR=$(awk '{print $4; exit}' "$1.out")
  export MSMQ_SERVER=$ADDR MSMQ_CA=$1/tls/cert.pem
  export MSMQ_METRICS=$(grep -o 'http://[^)]*' "$1.out" | head -1)
}
stop_broker() { kill -TERM "$PID"; wait "$PID" || true; }
field() { sed -E "s/.*\"$1\":([0-9.e+-]+).*/\1/"; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

: >"$WORK/produce" ; : >"$WORK/latency" ; : >"$WORK/consume" ; : >"$WORK/rss" ; : >"$WORK/tx" ; : >"$WORK/ratio"
: >"$WORK/consume_acks" ; : >"$WORK/acks_ratio"
for run in $(seq "$RUNS"); do
  start_broker "$WORK/b$run"
  p=$("$MSMQ" bench produce --producers 4 --batch 100 --size 1024 --count "$COUNT" --duration 120s --json)
  echo "produce  $p"; echo "$p" | field messages_per_sec >>"$WORK/produce"
  l=$("$MSMQ" bench produce --producers 1 --batch 1 --size 1024 --count 10000 --duration 60s --json)
  echo "latency  $l"; echo "$l" | field p99_ms >>"$WORK/latency"
  # Offset commits, then per-message acks on the same backlog (two JSON lines).
  c=$("$MSMQ" bench consume --count "$COUNT" --size 1024 --batch 100 --duration 300s --mode both --json)
  echo "consume  $c"
  echo "$c" | head -1 | field messages_per_sec >>"$WORK/consume"
  echo "$c" | tail -1 | field messages_per_sec >>"$WORK/consume_acks"
  echo "$c" | tail -1 | field acks_to_offsets_ratio >>"$WORK/acks_ratio"
  t=$("$MSMQ" bench tx --producers 4 --size 1024 --count "$TX_COUNT" --duration 120s --json)
  echo "tx       $t"; echo "$t" | field messages_per_sec >>"$WORK/tx"; echo "$t" | field tx_to_plain_ratio >>"$WORK/ratio"
  stop_broker
  # Peak memory with a backlog that nobody consumes.
  start_broker "$WORK/r$run"
  "$MSMQ" bench produce --producers 4 --batch 100 --size 1024 --count "$COUNT" --topic backlog --duration 120s --json >/dev/null
  sleep 2
  rss=$(awk '/VmHWM/ {print $2}' "/proc/$PID/status")
  echo "peak RSS with a $COUNT-message backlog: $((rss / 1024)) MiB"; echo "$((rss / 1024))" >>"$WORK/rss"
  stop_broker
  rm -rf "$WORK/b$run" "$WORK/r$run"
done
echo
echo "medians of $RUNS runs:"
echo "  produce 4x100:           $(median <"$WORK/produce") messages/s"
echo "  single-message p99:      $(median <"$WORK/latency") ms"
echo "  consume $COUNT backlog: $(median <"$WORK/consume") messages/s"
echo "  same, per-message acks:  $(median <"$WORK/consume_acks") messages/s (ratio to offsets $(median <"$WORK/acks_ratio"))"
echo "  peak RSS with backlog:   $(median <"$WORK/rss") MiB"
echo "  transactions (4 producers, half + commit): $(median <"$WORK/tx") committed/s"
echo "  transactions / plain produce, same load:   $(median <"$WORK/ratio")"
