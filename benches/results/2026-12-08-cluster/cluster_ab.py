#!/usr/bin/env python3
"""Interleaved reps of `quictun bench --workloads cluster` (c=64, 5 s), two binaries: rows per via."""
import json, subprocess, sys, statistics
BASE = ["bench", "--transports", "quic", "--workloads", "cluster", "--concurrency", "64", "--duration", "5"]
bins = [("old", sys.argv[3]), ("new", sys.argv[4])]
reps, out = int(sys.argv[1]), sys.argv[2]
rows = {(n, v): [] for n, _ in bins for v in ("holding", "forwarding")}
log = open(out, "w")
print("arms:", bins, file=log, flush=True)
for rep in range(1, reps + 1):
    order = bins if rep % 2 == 1 else list(reversed(bins))
    for name, exe in order:
        d = f"/tmp/ab2/cl-{name}-{rep}"
        subprocess.run([exe] + BASE + ["--out", d], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        for r in json.load(open(f"{d}/results.json"))["rows"]:
            via = "holding" if r["variant"].startswith("holding") else "forwarding"
            v = (r["requests_per_sec"], r["tunnel_cpu_us_per_request"], r["latency"]["p99_ms"])
            rows[(name, via)].append(v)
            print(f"{name} {rep} {via} {v[0]:.0f} req/s {v[1]:.1f} us/req p99 {v[2]:.3f}", file=log, flush=True)
for via in ("holding", "forwarding"):
    for n, _ in bins:
        vs = rows[(n, via)]
        print(f"=> {n} {via}: median {statistics.median(v[0] for v in vs):.0f} req/s, {statistics.median(v[1] for v in vs):.1f} us/req, p99 {statistics.median(v[2] for v in vs):.2f} ms", file=log)
    rate = [b[0] / a[0] for a, b in zip(rows[("old", via)], rows[("new", via)])]
    cpu = [b[1] / a[1] for a, b in zip(rows[("old", via)], rows[("new", via)])]
    print(f"=> {via} new/old rate pairs median {statistics.median(rate):.3f} ({min(rate):.3f}-{max(rate):.3f}); CPU {statistics.median(cpu):.3f}", file=log, flush=True)
