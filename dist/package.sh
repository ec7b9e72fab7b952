#!/bin/sh
# Builds the release binary and splits its line tables into a separate file, as distributions
# ship debug symbols: dist/out/quictun (small, what you install) and dist/out/quictun.debug
# (keep it: backtraces and debuggers find it through the binary's .gnu_debuglink, in the same
# directory or under /usr/lib/debug).
set -eu
cd "$(dirname "$0")/.."
cargo build --release --locked -p quictun
out=dist/out
mkdir -p "$out"
cp target/release/quictun "$out/quictun"
objcopy --only-keep-debug "$out/quictun" "$out/quictun.debug"
objcopy --strip-debug --add-gnu-debuglink="$out/quictun.debug" "$out/quictun"
ls -l target/release/quictun "$out/quictun" "$out/quictun.debug"
