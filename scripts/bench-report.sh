#!/usr/bin/env bash
# Writes docs/benchmarks.md and docs/benchmarks.png from real `msmq bench`
# runs: produce (4 producers and 1), drains (1 consumer and 4), single-message
# latency, end-to-end latency over time, transactions and a plugin drain,
# each RUNS times (default 3), every one on a fresh release-build broker in a
# temporary directory on a loopback port.
# The report states the machine, the commit and every command; the plot
# shows end-to-end throughput and latency over the first run's E2E_SECS.
# Installs Debian's python3-matplotlib for the plot if it is missing.
#
#   scripts/bench-report.sh            # RUNS=3 COUNT=2000000 E2E_SECS=30
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
COUNT=${COUNT:-2000000}
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

# name | command after `msmq bench` (run as written, one JSON summary each).
# The first four are the performance issue's shapes: 4 partitions, 1,000-byte
# messages in batches of 100, 100-message polls.
SHAPE="--partitions 4 --size 1000 --batch 100 --count $COUNT"
BENCHES=(
  "produce4|produce --producers 4 $SHAPE --disk-probe $WORK --duration 300s"
  "produce1|produce --producers 1 $SHAPE --duration 300s"
  "consume1|consume --consumers 1 --max-messages 100 $SHAPE --duration 300s"
  "consume4|consume --consumers 4 --max-messages 100 $SHAPE --duration 300s"
  "latency|produce --producers 1 --batch 1 --size 1024 --count 10000 --duration 60s"
  "e2e|e2e --producers 2 --consumers 1 --rate 2500 --batch 50 --size 1024 --count 100000000 --duration ${E2E_SECS}s --report-every 1s"
  "tx|tx --producers 4 --size 1024 --count 200000 --duration 120s"
  "plugin|plugin --component $WASM/ack_all.wasm --batch-messages 1000 --count 1000000 --size 1024 --duration 600s"
)
# Every bench of every run on a fresh broker.
for run in $(seq "$RUNS"); do
  for bench in "${BENCHES[@]}"; do
    name=${bench%%|*}
    start_broker "$WORK/b$run-$name"
    # shellcheck disable=SC2086
    "$MSMQ" bench ${bench#*|} --json >"$WORK/$name.$run"
    echo "run $run $name: $(grep '"bench"' "$WORK/$name.$run" | head -1 | cut -c1-160)…"
    stop_broker
    rm -rf "$WORK/b$run-$name"
  done
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

def eff(name):
    """Efficiency figures, medians: CPU s per million, write amplification, peak RSS."""
    parts = []
    if all("broker_cpu_seconds_per_million" in x for x in summaries(name)):
        parts.append(f"{med(name, 'broker_cpu_seconds_per_million'):.2f} broker CPU s per million")
    if all("write_amplification" in x for x in summaries(name)):
        parts.append(f"write amplification {med(name, 'write_amplification'):.2f}")
    if all("broker_peak_rss_mib" in x for x in summaries(name)):
        parts.append(f"broker peak RSS {med(name, 'broker_peak_rss_mib'):.0f} MiB")
    return "; ".join(parts)

def each(name, field, fmt):
    return ", ".join(fmt.format(x[field]) for x in summaries(name))

rows = [
    ("produce, 4 producers", "produce4", f"{med('produce4', 'messages_per_sec'):,.0f} msg/s "
     f"(runs: {each('produce4', 'messages_per_sec', '{:,.0f}')}), p99 {med('produce4', 'p99_ms'):.1f} ms; "
     f"{eff('produce4')}; {med('produce4', 'disk_fraction'):.2f} of the disk's "
     f"{med('produce4', 'disk_sequential_mb_per_sec'):.0f} MB/s (`bench disk`, same run)"),
    ("produce, 1 producer", "produce1", f"{med('produce1', 'messages_per_sec'):,.0f} msg/s "
     f"(runs: {each('produce1', 'messages_per_sec', '{:,.0f}')}), p99 {med('produce1', 'p99_ms'):.1f} ms; {eff('produce1')}"),
    ("drain, 1 consumer, 100-message polls", "consume1", f"{med('consume1', 'messages_per_sec'):,.0f} msg/s "
     f"(runs: {each('consume1', 'messages_per_sec', '{:,.0f}')}), p99 {med('consume1', 'p99_ms'):.1f} ms per poll (commits in the background); {eff('consume1')}"),
    ("drain, 4 consumers, 100-message polls", "consume4", f"{med('consume4', 'messages_per_sec'):,.0f} msg/s "
     f"(runs: {each('consume4', 'messages_per_sec', '{:,.0f}')}), p99 {med('consume4', 'p99_ms'):.1f} ms per poll (commits in the background); {eff('consume4')}"),
    ("produce, one message per request, waiting for each ack", "latency",
     f"p50 {med('latency', 'p50_ms'):.2f} ms, p99 {med('latency', 'p99_ms'):.2f} ms"),
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
# Sections other scripts write (bench-plugin-languages.sh,
# bench-idempotence.sh), between <!-- NAME:begin --> and <!-- NAME:end -->
# markers: keep them all across a regeneration.
import re
try:
    previous = open("docs/benchmarks.md").read()
    kept = "\n".join(m.group(0) for m in re.finditer(
        r"<!-- ([a-z-]+):begin -->.*?<!-- \1:end -->", previous, re.S))
    kept = kept + "\n" if kept else ""
except OSError:
    kept = ""
with open("docs/benchmarks.md", "w") as out:
    out.write(f"""# Benchmarks

Generated by `scripts/bench-report.sh` from real runs of `msmq bench`; do
not edit by hand. Each figure is the median of {runs} runs, each run on a
fresh broker (release build, embedded defaults: `durability = immediate`,
each group commit synced before it is acknowledged) listening on 127.0.0.1, with the benchmark
client on the same machine.

- commit: `{commit}`
- machine: {os.cpu_count()} cores ({cpu}), {mem} memory, {platform.system()} {platform.release()}, data on {fs}
- messages: 1,000-byte payloads in the four produce and drain shapes, 1 KiB in the others

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
        command = commands[name].replace(os.getcwd() + '/', '').replace(work, '<temporary directory>')
        out.write(f"| {label} | `{command}` |\n")
    if kept:
        out.write("\n" + kept)
print(open("docs/benchmarks.md").read())
PY
