#!/usr/bin/env python3
"""Interleaved reps of `quictun bench` small (c=64, 5 s) over arms: name=exe[:extra args]. Ratios against the first arm."""
import json, subprocess, sys, statistics, shlex
BASE = ["bench", "--transports", "quic", "--workloads", "small", "--concurrency", "64", "--duration", "5"]
reps, out = int(sys.argv[1]), sys.argv[2]
arms = []
for a in sys.argv[3:]:
    name, rest = a.split("=", 1)
    parts = shlex.split(rest)
    arms.append((name, parts[0], parts[1:]))
rows = {n: [] for n, _, _ in arms}
log = open(out, "w")
print("arms:", " | ".join(f"{n}={e} {' '.join(x)}" for n, e, x in arms), file=log, flush=True)
for rep in range(1, reps + 1):
    order = arms[rep % len(arms):] + arms[:rep % len(arms)]
    if rep % 2 == 0: order = list(reversed(order))
    for name, exe, extra in order:
        d = f"/tmp/ab2/arm-{name}-{rep}"
        subprocess.run([exe] + BASE + extra + ["--out", d], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        r = json.load(open(f"{d}/results.json"))["rows"][0]
        v = (r["requests_per_sec"], r["tunnel_cpu_us_per_request"], r["latency"]["p99_ms"], r["errors"])
        rows[name].append(v)
        print(f"{name} {rep} {v[0]:.0f} req/s {v[1]:.1f} us/req p99 {v[2]:.3f} errors={v[3]}", file=log, flush=True)
base = arms[0][0]
for n, _, _ in arms:
    print(f"=> {n}: median {statistics.median(v[0] for v in rows[n]):.0f} req/s, {statistics.median(v[1] for v in rows[n]):.1f} us/req", file=log)
for n, _, _ in arms[1:]:
    rate = [b[0] / a[0] for a, b in zip(rows[base], rows[n])]
    cpu = [b[1] / a[1] for a, b in zip(rows[base], rows[n])]
    print(f"=> {n}/{base} rate pair ratios median {statistics.median(rate):.3f} ({min(rate):.3f}-{max(rate):.3f}); CPU per request median {statistics.median(cpu):.3f} ({min(cpu):.3f}-{max(cpu):.3f})", file=log, flush=True)
