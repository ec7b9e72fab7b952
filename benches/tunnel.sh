#!/usr/bin/env bash
# Measures the QUIC tunnel with real processes on loopback (relay, agent and upstream each its own
# process): wrk with 1 KiB responses through the tunnel and straight to the upstream, a 1 GiB
# download and a 1 GiB upload through the tunnel, and the peak RSS (VmHWM) of relay and agent.
#
#   benches/tunnel.sh            # needs wrk and curl; builds the release binary first
#
# Ports: BASE_PORT (default 18000) .. +3 on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${BASE_PORT:-18000}
UP=127.0.0.1:$BASE HTTP=127.0.0.1:$((BASE + 1)) QUIC=127.0.0.1:$((BASE + 2))
DURATION=${DURATION:-10s}
cargo build --release -q
BIN=$PWD/target/release/quictun
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

wait_for() { # command..., retried for up to 20 s
    for _ in $(seq 200); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "timed out waiting for: $*" >&2; exit 1
}
rss() { awk -v k="$2:" '$1 == k { print $2 / 1024 " MiB" }' "/proc/$1/status"; }

"$BIN" cert gen --out "$work/certs" >/dev/null
PIN=$("$BIN" cert pin "$work/certs/relay.crt")
cat > "$work/relay.toml" <<TOML
[relay]
quic_listen = "$QUIC"
http_listen = "$HTTP"
cert = "$work/certs/relay.crt"
key = "$work/certs/relay.key"
[[clients]]
id = "bench"
token = "bench-token"
group = "bench"
[[upstreams]]
name = "up"
group = "bench"
targets = ["http://$UP"]
[[routes]]
host = "*"
upstream = "up"
TOML

RUST_LOG=warn "$BIN" upstream --listen "$UP" >/dev/null & pids+=($!)
RUST_LOG=warn "$BIN" relay --config "$work/relay.toml" >/dev/null & relay=$!; pids+=($relay)
wait_for curl -s "http://$UP/"
RUST_LOG=warn QUICTUN_TOKEN=bench-token "$BIN" agent --relay "$QUIC" --pin "$PIN" --client-id bench >/dev/null & agent=$!; pids+=($agent)
wait_for curl -sf "http://$HTTP/"

echo "== machine: $(nproc) cores, $(uname -r), $(date -u +%F)"
echo "== idle RSS: relay $(rss $relay VmRSS), agent $(rss $agent VmRSS)"
echo "== wrk -t2 -c64 -d$DURATION --latency, 1 KiB responses, through the tunnel"
wrk -t2 -c64 -d"$DURATION" --latency "http://$HTTP/bytes/1024" | grep -E "Requests/sec|Latency|50%|99%|Socket errors|Non-2xx"
echo "== the same, straight to the upstream"
wrk -t2 -c64 -d"$DURATION" --latency "http://$UP/bytes/1024" | grep -E "Requests/sec|Latency|50%|99%|Socket errors|Non-2xx"
echo "== 1 GiB download through the tunnel"
curl -s -o /dev/null -w 'bytes %{size_download}  %{time_total} s  %{speed_download} B/s\n' "http://$HTTP/bytes/1073741824"
echo "== 1 GiB upload through the tunnel (chunked, streamed from /dev/zero)"
head -c 1073741824 /dev/zero | curl -s -T - -X POST -w '  %{time_total} s  %{speed_upload} B/s\n' "http://$HTTP/sink"
echo "== peak RSS (VmHWM): relay $(rss $relay VmHWM), agent $(rss $agent VmHWM)"
