#!/usr/bin/env bash
# The crash driver (tests/e2e/crash_driver.rs) for the seeds given, or three
# random ones: a mixed workload against a real broker that is SIGKILLed at
# seeded random moments (KILLS, default 30), with the oracle's check after
# every restart. Prints each seed and the oracle's counts; a failing seed
# replays with `scripts/crash.sh SEED`. CI runs seeds 1, 2 and 3 as part of
# the end-to-end suite.
#
#   scripts/crash.sh              # three random seeds
#   KILLS=100 scripts/crash.sh 42 # seed 42, 100 kills
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=("$@")
if [ ${#seeds[@]} -eq 0 ]; then
  seeds=("$((RANDOM * 32768 + RANDOM))" "$((RANDOM * 32768 + RANDOM))" "$((RANDOM * 32768 + RANDOM))")
fi
failed=0
for seed in "${seeds[@]}"; do
  echo "== seed $seed"
  if ! MSMQ_CRASH_SEED=$seed MSMQ_CRASH_DRIVER_KILLS=${KILLS:-30} \
    cargo nextest run -p msmq-broker --test e2e crash_driver::seed_one --no-capture 2>&1 |
    grep -E "crash driver|round [0-9]+|PASS|FAIL|panicked"; then
    failed=1
  fi
done
exit $failed
