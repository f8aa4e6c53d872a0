#!/usr/bin/env bash
# Writes docs/benchmarks.md and docs/benchmarks.png from real `msmq bench`
# runs: produce, single-message latency, consume, end-to-end latency over
# time, transactions and a plugin drain, each RUNS times (default 3) on a
# fresh release-build broker in a temporary directory on a loopback port.
# The report states the machine, the commit and every command; the plot
# shows end-to-end throughput and latency over the first run's E2E_SECS.
# Installs Debian's python3-matplotlib for the plot if it is missing.
#
#   scripts/bench-report.sh            # RUNS=3 COUNT=1000000 E2E_SECS=30
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
COUNT=${COUNT:-1000000}
E2E_SECS=${E2E_SECS:-30}
# The plot needs matplotlib: the python3 on PATH if it has it, else Debian's.
PY=python3
if ! "$PY" -c 'import matplotlib' 2>/dev/null; then
  PY=/usr/bin/python3
  "$PY" -c 'import matplotlib' 2>/dev/null || bash scripts/apt-install.sh python3-matplotlib
fi
cargo build --release --quiet
cargo build --release --quiet --target wasm32-wasip2 --manifest-path plugins/Cargo.toml
MSMQ=$PWD/target/release/msmq
WASM=$PWD/plugins/target/wasm32-wasip2/release
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

start_broker() { # dir -> sets PID and the client's MSMQ_SERVER, MSMQ_CA
  "$MSMQ" serve --listen 127.0.0.1:0 --http 127.0.0.1:0 --data-dir "$1" --log warn >"$1.out" 2>"$1.err" &
  PID=$!
  for _ in $(seq 2000); do [ -s "$1.out" ] && break; sleep 0.005; done
  export MSMQ_SERVER=$(awk '{print $4; exit}' "$1.out") MSMQ_CA=$1/tls/cert.pem
  export MSMQ_METRICS=$(grep -o 'http://[^)]*' "$1.out" | head -1)
}
stop_broker() { kill -TERM "$PID"; wait "$PID" || true; }

# name | command after `msmq bench` (run as written, one JSON summary each)
BENCHES=(
  "produce|produce --producers 4 --batch 100 --size 1024 --count $COUNT --duration 120s"
  "latency|produce --producers 1 --batch 1 --size 1024 --count 10000 --duration 60s"
  "consume|consume --count $COUNT --size 1024 --batch 100 --duration 300s"
  "e2e|e2e --producers 2 --consumers 1 --rate 2500 --batch 50 --size 1024 --count 100000000 --duration ${E2E_SECS}s --report-every 1s"
  "tx|tx --producers 4 --size 1024 --count 200000 --duration 120s"
  "plugin|plugin --component $WASM/ack_all.wasm --batch-messages 1000 --count $COUNT --size 1024 --duration 600s"
)
for run in $(seq "$RUNS"); do
  start_broker "$WORK/b$run"
  for bench in "${BENCHES[@]}"; do
    name=${bench%%|*}
    # shellcheck disable=SC2086
    "$MSMQ" bench ${bench#*|} --json >"$WORK/$name.$run"
    echo "run $run $name: $(grep '"bench"' "$WORK/$name.$run" | head -1 | cut -c1-160)…"
  done
  stop_broker
  rm -rf "$WORK/b$run"
done

printf '%s\n' "${BENCHES[@]}" >"$WORK/commands"
"$PY" - "$WORK" "$RUNS" "$(git rev-parse --short HEAD)" <<'PY'
import json, os, platform, statistics, subprocess, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

work, runs, commit = sys.argv[1], int(sys.argv[2]), sys.argv[3]
commands = dict(l.split("|", 1) for l in open(f"{work}/commands").read().splitlines())

def summaries(name):
    """The first JSON summary (a line with "bench") of each run."""
    out = []
    for run in range(1, runs + 1):
        for line in open(f"{work}/{name}.{run}"):
            if line.startswith("{") and '"bench"' in line:
                out.append(json.loads(line))
                break
    return out

def med(name, field):
    return statistics.median(s[field] for s in summaries(name))

rows = [
    ("produce, 4 producers, batches of 100", "produce", f"{med('produce', 'messages_per_sec'):,.0f} msg/s, "
     f"{med('produce', 'mb_per_sec'):,.0f} MB/s"),
    ("produce, one message per request, waiting for each ack", "latency",
     f"p50 {med('latency', 'p50_ms'):.2f} ms, p99 {med('latency', 'p99_ms'):.2f} ms"),
    ("drain a backlog, one group", "consume", f"{med('consume', 'messages_per_sec'):,.0f} msg/s"),
    ("end to end, 2 producers x 2,500 msg/s, one group", "e2e",
     f"{med('e2e', 'messages_per_sec'):,.0f} msg/s received, p50 {med('e2e', 'p50_ms'):.2f} ms, "
     f"p99 {med('e2e', 'p99_ms'):.2f} ms (produce to receive)"),
    ("transactions, half + commit, 4 producers", "tx",
     f"{med('tx', 'messages_per_sec'):,.0f} committed/s ({med('tx', 'tx_to_plain_ratio'):.2f} of plain produce, same run)"),
    ("plugin drain, ack-all plugin, batches of 1,000", "plugin",
     f"{med('plugin', 'plugin_messages_per_sec'):,.0f} msg/s ({med('plugin', 'plugin_to_native_ratio'):.2f} x a native consumer, same run)"),
]

intervals = [json.loads(l) for l in open(f"{work}/e2e.1") if l.startswith('{"interval_end_s"')]
fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
t = [r["interval_end_s"] for r in intervals]
top.plot(t, [r["messages_per_sec"] for r in intervals], color="#1f77b4")
top.set_ylabel("received msg/s")
top.set_ylim(bottom=0)
top.set_title("msmq bench e2e: 2 producers x 2,500 msg/s of 1 KiB, one group (run 1)")
bottom.plot(t, [r["p50_ms"] for r in intervals], label="p50", color="#2ca02c")
bottom.plot(t, [r["p99_ms"] for r in intervals], label="p99", color="#d62728")
bottom.set_ylabel("produce to receive, ms")
bottom.set_xlabel("seconds")
bottom.set_ylim(bottom=0)
bottom.legend()
fig.tight_layout()
fig.savefig("docs/benchmarks.png", dpi=100)

def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()
    except Exception:
        return "?"

cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip()
mem = sh("awk '/MemTotal/ {printf \"%.0f GiB\", $2/1048576}' /proc/meminfo")
fs = sh("df -T . | awk 'NR==2 {print $2}'")
# The per-language plugin section is written by its own script
# (bench-plugin-languages.sh); keep it across a regeneration.
try:
    kept = open("docs/benchmarks.md").read()
    begin, end = "<!-- plugin-languages:begin -->", "<!-- plugin-languages:end -->"
    kept = kept[kept.index(begin):kept.index(end) + len(end)] + "\n"
except (OSError, ValueError):
    kept = ""
with open("docs/benchmarks.md", "w") as out:
    out.write(f"""# Benchmarks

Generated by `scripts/bench-report.sh` from real runs of `msmq bench`; do
not edit by hand. Each figure is the median of {runs} runs, each run on a
fresh broker (release build, embedded defaults: `durability = immediate`,
one fsync per group commit) listening on 127.0.0.1, with the benchmark
client on the same machine.

- commit: `{commit}`
- machine: {os.cpu_count()} cores ({cpu}), {mem} memory, {platform.system()} {platform.release()}, data on {fs}
- messages: 1 KiB payloads

| benchmark | result |
| --- | --- |
""")
    for label, _, result in rows:
        out.write(f"| {label} | {result} |\n")
    out.write("""
![end-to-end throughput and latency over time](benchmarks.png)

## Commands

Each is `msmq bench` with these arguments and `--json`, against
`msmq serve --listen 127.0.0.1:0 --data-dir <fresh temporary directory>`:

| benchmark | arguments |
| --- | --- |
""")
    for label, name, _ in rows:
        out.write(f"| {label} | `{commands[name].replace(os.getcwd() + '/', '')}` |\n")
    if kept:
        out.write("\n" + kept)
print(open("docs/benchmarks.md").read())
PY
