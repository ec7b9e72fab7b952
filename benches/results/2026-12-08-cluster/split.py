#!/usr/bin/env python3
"""Per-process CPU per request in the cluster workload: samples /proc/<pid>/stat of relay-a,
relay-b and the agent for 6 s inside each row (10 s rows), divides by the row's requests in those
6 s (its req/s x 6)."""
import json, os, subprocess, sys, time, glob
exe, out, reps = sys.argv[1], sys.argv[2], int(sys.argv[3])
tick = os.sysconf("SC_CLK_TCK")
def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / tick
def pids():
    ps = subprocess.run(["pgrep", "-af", exe], capture_output=True, text=True).stdout.splitlines()
    a = b = ag = None
    for line in ps:
        pid, cmd = line.split(" ", 1)
        if "relay-b/relay.toml" in cmd: b = pid
        elif " relay --config" in cmd: a = pid
        elif "bench-agents" in cmd: ag = pid
    return a, b, ag
log = open(out, "w")
for rep in range(1, reps + 1):
    d = f"/tmp/ab2/split-{rep}"
    errlog = open(f"{d}.log", "w")
    p = subprocess.Popen([exe, "bench", "--transports", "quic", "--workloads", "cluster", "--concurrency", "64", "--duration", "10", "--out", d], stdout=subprocess.DEVNULL, stderr=errlog)
    samples = {}
    for row in ("holding", "forwarding"):
        while True:
            if os.path.exists(f"{d}.log") and row in open(f"{d}.log").read():
                break
            time.sleep(0.2)
        time.sleep(1.5)
        procs = pids()
        before = [cpu(x) for x in procs]
        time.sleep(6)
        after = [cpu(x) for x in procs]
        samples[row] = [y - x for x, y in zip(before, after)]
    p.wait()
    rows = json.load(open(f"{d}/results.json"))["rows"]
    for r in rows:
        row = "holding" if r["variant"].startswith("holding") else "forwarding"
        n = r["requests_per_sec"] * 6
        a, b, ag = (s / n * 1e6 for s in samples[row])
        print(f"rep {rep} {row}: {r['requests_per_sec']:.0f} req/s; CPU per request: relay-a {a:.1f} us, relay-b {b:.1f} us, agent {ag:.1f} us, total {a+b+ag:.1f} us (the row's own figure {r['tunnel_cpu_us_per_request']:.1f})", file=log, flush=True)
