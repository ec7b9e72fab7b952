#!/usr/bin/env bash
# Builds every fuzz target and runs each for SECONDS (default 30), starting from the committed
# seeds. Prints one summary line per target: executions, corpus size, and the verdict.
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`); runs on stable with RUSTC_BOOTSTRAP=1.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-30}"
export RUSTC_BOOTSTRAP=1
# cargo fuzz has no --locked: check the lock file first, so that the build uses exactly it.
cargo metadata --locked --format-version 1 >/dev/null
cargo fuzz build
for target in $(cargo fuzz list); do
  mkdir -p "corpus/$target"
  log="$(mktemp)"
  if ! cargo fuzz run "$target" "corpus/$target" "seeds/$target" -- \
      -max_total_time="$seconds" -max_len=65536 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "fuzz: $target FAILED (crash input under fuzz/artifacts/$target)"
    exit 1
  fi
  execs="$(grep -m1 'stat::number_of_executed_units' "$log" | awk '{print $2}')"
  echo "fuzz: $target ok: ${execs:-?} executions in ${seconds}s, corpus $(ls "corpus/$target" | wc -l) inputs"
  rm -f "$log"
done
