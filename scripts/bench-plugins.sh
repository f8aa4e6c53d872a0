#!/usr/bin/env bash
# Plugin benchmarks, each run RUNS times (default 3) against a fresh
# release-build broker in a temporary directory on a loopback port; prints
# every run's JSON and the medians:
#   - the ack-all plugin draining COUNT 1 KiB messages, against a native
#     consumer (poll + commit) draining the same backlog in the same run, at
#     plugin batch sizes 1000 and 100 (the latter gives the per-batch host cost);
#   - the same drain beside misbehaving plugins (looper, memory-hog, trapper),
#     as a ratio to the drain alone;
#   - deploy time (first deploy compiles, later ones load the cached code),
#     restart time with 20 plugins deployed, and broker memory with 20 idle
#     plugins.
#
#   scripts/bench-plugins.sh            # RUNS=3 COUNT=1000000
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
COUNT=${COUNT:-1000000}
PLUGINS=${PLUGINS:-20}
cargo build --release --quiet
cargo build --release --quiet --target wasm32-wasip2 --manifest-path plugins/Cargo.toml
MSMQ=$PWD/target/release/msmq
WASM=$PWD/plugins/target/wasm32-wasip2/release
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

start_broker() { # dir -> sets PID, ADDR, START_MS (time to the listening line)
  local t0 t1
  : >"$1.out"
  t0=$(date +%s%N)
  "$MSMQ" serve --listen "${2:-127.0.0.1:0}" --http 127.0.0.1:0 --data-dir "$1" --log warn >"$1.out" 2>>"$1.err" &
  PID=$!
  for _ in $(seq 2000); do
    [ -s "$1.out" ] && break
    sleep 0.005
  done
  t1=$(date +%s%N)
  START_MS=$(( (t1 - t0) / 1000000 ))
  ADDR=$(awk '{print $4; exit}' "$1.out")
  export MSMQ_SERVER=$ADDR MSMQ_CA=$1/tls/cert.pem
}
stop_broker() { kill -TERM "$PID"; wait "$PID" || true; }
rss_mib() { awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$PID/status"; }
field() { sed -E "s/.*\"$1\":([0-9.e+-]+).*/\1/"; }
median() { sort -g | awk '{a[NR]=$1} END {v=a[int((NR+1)/2)]; if (v+0 >= 100) printf "%.0f\n", v; else printf "%.2f\n", v}'; }

for f in native plugin1000 ratio1000 plugin100 ratio100 batch_us call_us host_us beside first_deploy compile cached restart rss_before rss_idle rss_restart; do
  : >"$WORK/$f"
done
for run in $(seq "$RUNS"); do
  start_broker "$WORK/b$run"
  j=$("$MSMQ" bench plugin --component "$WASM/ack_all.wasm" --batch-messages 1000 \
      --count "$COUNT" --size 1024 --duration 600s --json)
  echo "drain@1000 $j"
  echo "$j" | field native_messages_per_sec >>"$WORK/native"
  echo "$j" | field plugin_messages_per_sec >>"$WORK/plugin1000"
  echo "$j" | field plugin_to_native_ratio >>"$WORK/ratio1000"
  j=$("$MSMQ" bench plugin --component "$WASM/ack_all.wasm" --batch-messages 100 \
      --count "$COUNT" --size 1024 --duration 600s --json \
      --neighbour "$WASM/looper.wasm" --neighbour "$WASM/memory_hog.wasm" --neighbour "$WASM/trapper.wasm")
  echo "drain@100 $j"
  echo "$j" | field plugin_messages_per_sec >>"$WORK/plugin100"
  echo "$j" | field plugin_to_native_ratio >>"$WORK/ratio100"
  echo "$j" | field per_batch_us >>"$WORK/batch_us"
  echo "$j" | field per_batch_in_call_us >>"$WORK/call_us"
  echo "$j" | field per_batch_host_loop_us >>"$WORK/host_us"
  echo "$j" | field beside_to_alone_ratio >>"$WORK/beside"
  stop_broker

  # Deploys, memory and restart on a fresh broker.
  start_broker "$WORK/d$run"
  sleep 0.5
  rss_mib >>"$WORK/rss_before"
  j=$("$MSMQ" bench plugin-deploy --component "$WASM/ack_all.wasm" --plugins "$PLUGINS" --json)
  echo "deploy $j"
  echo "$j" | field first_deploy_ms >>"$WORK/first_deploy"
  echo "$j" | field first_compile_ms >>"$WORK/compile"
  echo "$j" | field cached_deploy_median_ms >>"$WORK/cached"
  sleep 1
  rss_mib >>"$WORK/rss_idle"
  stop_broker
  start_broker "$WORK/d$run" "$ADDR"
  echo "$START_MS" >>"$WORK/restart"
  sleep 1
  echo "restart with $PLUGINS plugins: listening after $START_MS ms; $("$MSMQ" plugin list | grep -c running) running"
  rss_mib >>"$WORK/rss_restart"
  stop_broker
done

echo
echo "medians of $RUNS runs ($COUNT messages of 1 KiB, durability immediate):"
echo "  native consumer drain (poll 2000 + commit):  $(median <"$WORK/native") msg/s"
echo "  ack-all plugin drain, batch 1000:            $(median <"$WORK/plugin1000") msg/s  (ratio to native $(median <"$WORK/ratio1000"))"
echo "  ack-all plugin drain, batch 100:             $(median <"$WORK/plugin100") msg/s  (ratio to native $(median <"$WORK/ratio100"))"
echo "  per batch of 100: $(median <"$WORK/batch_us") us in all, $(median <"$WORK/call_us") us in the call, $(median <"$WORK/host_us") us host loop (read + commit)"
echo "  drain beside looper, memory-hog, trapper:    ratio to alone $(median <"$WORK/beside")"
echo "  first deploy: $(median <"$WORK/first_deploy") ms (compile $(median <"$WORK/compile") ms); cached deploy: $(median <"$WORK/cached") ms"
echo "  restart with $PLUGINS plugins: $(median <"$WORK/restart") ms to listening"
echo "  broker RSS: $(median <"$WORK/rss_before") MiB fresh, $(median <"$WORK/rss_idle") MiB with $PLUGINS idle plugins, $(median <"$WORK/rss_restart") MiB after restart with them"
