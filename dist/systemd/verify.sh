#!/bin/sh
# Checks the systemd units with `systemd-analyze verify`, against a quictun binary (the first
# argument, default target/release/quictun) standing in for /usr/local/bin/quictun.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
bin=$(realpath "${1:-target/release/quictun}")
test -x "$bin" || { echo "no quictun binary at $bin (build it first)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for unit in "$here"/*.service; do
    sed "s|/usr/local/bin/quictun|$bin|g" "$unit" > "$work/$(basename "$unit")"
done
# The units run as the quictun user; verify resolves it.
id quictun >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin quictun
out=$(systemd-analyze verify "$work"/*.service 2>&1) || { echo "$out" >&2; exit 1; }
# verify exits 0 on some warnings: any line about our units is a failure.
if echo "$out" | grep -F "$work" >&2; then exit 1; fi
echo "systemd units verified: $(cd "$work" && ls)"
