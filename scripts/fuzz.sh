#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets: the four wire frame decoders
# and the filter parser) for FUZZ_SECS seconds each (default 60), starting
# from the corpus kept in fuzz/corpus/<target>. Installs cargo-fuzz from
# crates.io if it is missing. A finding stops the run with the input saved
# under fuzz/artifacts/<target>/; fix it and add a regression test.
#
# cargo-fuzz needs nightly rustc flags; RUSTC_BOOTSTRAP=1 lets the stable
# toolchain of rust-toolchain.toml accept them, and `-s none` skips the
# sanitizer, which stable cannot build.
#
#   scripts/fuzz.sh                 # every target, 60 s each
#   FUZZ_SECS=600 scripts/fuzz.sh filter
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${FUZZ_SECS:-60}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz@0.13.2
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz list)
for target in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$target"
  echo "fuzz.sh: $target for ${SECS}s"
  RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz -s none "$target" "fuzz/corpus/$target" -- \
    -max_total_time="$SECS" -print_final_stats=1 2>&1 | grep -E "^(#[0-9]+: |Done|stat::number_of_executed_units|==|SUMMARY|thread|panicked)" | tail -4
done
echo "fuzz: ${#targets[@]} passed, 0 failed"
