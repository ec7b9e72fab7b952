#!/bin/sh
# Checks the systemd units with `systemd-analyze verify`, against a quictun binary (the first
# argument, default target/release/quictun) standing in for /usr/local/bin/quictun.
# The units run as the `quictun` system user, which verify resolves: without it the script
# stops and says how to create it, unless given --create-user (what CI does on its throwaway
# machine), in which case it creates it and says so.
set -eu
create_user=no
if [ "${1:-}" = "--create-user" ]; then create_user=yes; shift; fi
here=$(cd "$(dirname "$0")" && pwd)
bin=$(realpath "${1:-target/release/quictun}")
test -x "$bin" || { echo "no quictun binary at $bin (build it first)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for unit in "$here"/*.service; do
    sed "s|/usr/local/bin/quictun|$bin|g" "$unit" > "$work/$(basename "$unit")"
done
if ! id quictun >/dev/null 2>&1; then
    add="useradd --system --no-create-home --shell /usr/sbin/nologin quictun"
    if [ "$create_user" = no ]; then
        echo "the units run as the system user quictun, which does not exist here: create it with" >&2
        echo "  $add" >&2
        echo "or run $0 --create-user to have this script create it" >&2
        exit 1
    fi
    echo "creating the system user quictun: $add"
    $add
fi
out=$(systemd-analyze verify "$work"/*.service 2>&1) || { echo "$out" >&2; exit 1; }
# verify exits 0 on some warnings: any line about our units is a failure.
if echo "$out" | grep -F "$work" >&2; then exit 1; fi
echo "systemd units verified: $(cd "$work" && ls)"
