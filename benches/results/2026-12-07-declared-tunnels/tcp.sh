#!/usr/bin/env bash
# usage: tcp.sh BIN LABEL  -> prints: LABEL small_req/s cpu_us_per_req bulk_MBps bulk_cpu_s_per_GiB
set -euo pipefail
BIN=$1; LABEL=$2
work=$(mktemp -d); pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
trap "cat $work/relay.out $work/agent.out >&2" ERR
UP=127.0.0.1:19100 QUIC=127.0.0.1:19101 HTTP=127.0.0.1:19102 TCP=127.0.0.1:19103 ADMIN=127.0.0.1:19104
"$BIN" upstream --listen $UP > /dev/null 2>&1 & pids+=($!)
"$BIN" cert gen --out "$work/certs" >/dev/null
PIN=$("$BIN" cert pin "$work/certs/relay.crt")
cat > "$work/relay.toml" <<TOML
[relay]
quic_listen = "$QUIC"
http_listen = "$HTTP"
admin_listen = "$ADMIN"
transport = "quic"
cert = "$work/certs/relay.crt"
key = "$work/certs/relay.key"
[[clients]]
id = "bench"
token = "bench-token"
group = "bench"
[[tcp]]
listen = "$TCP"
group = "bench"
upstream = "$UP"
TOML
RUST_LOG=error "$BIN" relay --config "$work/relay.toml" > "$work/relay.out" 2>&1 & RELAY=$!; pids+=($RELAY)
for _ in $(seq 100); do grep -q "agent command" "$work/relay.out" 2>/dev/null && break; sleep 0.1; done
RUST_LOG=error QUICTUN_TOKEN=bench-token "$BIN" agent --relay $QUIC --pin "$PIN" --client-id bench > "$work/agent.out" 2>&1 & AGENT=$!; pids+=($AGENT)
for _ in $(seq 100); do grep -q "connected to" "$work/agent.out" 2>/dev/null && break; sleep 0.1; done
cpu() { awk '{print $14+$15}' /proc/$RELAY/stat /proc/$AGENT/stat | paste -sd+ | bc; }
HZ=$(getconf CLK_TCK)
c0=$(cpu)
n=$(python3 - "$TCP" <<'PY'
import sys, http.client, threading, time
host, port = sys.argv[1].split(":")
count = [0]*8
stop = time.time() + 5
def run(i):
    c = http.client.HTTPConnection(host, int(port))
    while time.time() < stop:
        c.request("GET", "/bytes/1024"); r = c.getresponse(); r.read(); count[i] += 1
ts = [threading.Thread(target=run, args=(i,)) for i in range(8)]
[t.start() for t in ts]; [t.join() for t in ts]
print(sum(count))
PY
)
c1=$(cpu)
small_cpu_us=$(echo "scale=1; ($c1-$c0)*1000000/$HZ/$n" | bc)
c2=$(cpu)
speed=$(curl -s -o /dev/null -w '%{speed_download}' http://$TCP/bytes/1073741824)
c3=$(cpu)
echo "$LABEL small $((n/5)) req/s, ${small_cpu_us} us/req; bulk $(echo "scale=0; $speed/1000000" | bc) MB/s, $(echo "scale=2; ($c3-$c2)/$HZ" | bc) s CPU/GiB"
