"""Placement decision time over many simulated node states (goal: < 1 ms for 1,000 nodes).

Each simulated node holds 50 models spread over its tiers (a few loaded with queued requests,
some in DRAM, the rest on SSD), its own measured bandwidths and queue delay; some views are
stale, a few nodes failed. Prints a markdown table: per cluster size, the median and p99 of one
place() call for a model that ~1/3 of the nodes hold.

    .venv/bin/python bench/placement_bench.py [--nodes 10 100 1000] [--repeat 200]
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sllmd.cluster.locality import NodeView  # noqa: E402
from sllmd.cluster.placement import place  # noqa: E402

GB = 10**9
MODELS = [f"model-{i}" for i in range(150)]


def simulated_views(n: int, rng: random.Random, now: float) -> list[NodeView]:
    views = []
    for i in range(n):
        models, instances = [], []
        for name in rng.sample(MODELS, 50):
            size = rng.choice((1, 2, 4, 8, 16)) * GB
            roll = rng.random()
            tiers = ["ssd"] + (["dram"] if roll < 0.4 else []) + (["device"] if roll < 0.08 else [])
            models.append({"name": name, "state": "loaded" if "device" in tiers else "in_dram",
                           "tiers": tiers, "checkpoint_bytes": size, "ssd_bytes": size})
            if "device" in tiers:
                instances.append({"name": name, "state": "loaded", "active_requests": rng.randint(0, 1),
                                  "queued": rng.randint(0, 4), "queue_depth": 4, "service_s": rng.uniform(0.2, 3)})
        state = {"models": models, "instances": instances, "queue_delay_s": rng.choice((0.0, 0.0, 0.5, 2.0)),
                 "bandwidths": {"dram_device": rng.uniform(5, 25) * GB, "ssd_device": rng.uniform(1, 7) * GB}}
        status = "failed" if rng.random() < 0.02 else "alive"
        age = rng.uniform(0, 3) if rng.random() > 0.05 else 30.0
        views.append(NodeView(f"node-{i:04d}", status, state, 1, now - age))
    return views


def measure(n: int, repeat: int, seed: int = 1) -> dict:
    rng = random.Random(seed)
    now = time.monotonic()
    views = simulated_views(n, rng, now)
    times = []
    for k in range(repeat):
        model = MODELS[k % len(MODELS)]
        t0 = time.perf_counter()
        decision = place(model, views, now, prefer="node-0000")
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"nodes": n, "median_ms": statistics.median(times) * 1e3,
            "p99_ms": times[min(len(times) - 1, int(len(times) * 0.99))] * 1e3,
            "candidates": len(decision.candidates)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--repeat", type=int, default=200)
    args = ap.parse_args(argv)
    print("| nodes | models/node | place() median | p99 | candidates | goal |")
    print("|---:|---:|---:|---:|---:|---|")
    for n in args.nodes:
        r = measure(n, args.repeat)
        goal = ("< 1 ms: " + ("met" if r["median_ms"] < 1.0 else "missed")) if n == 1000 else ""
        print(f"| {n} | 50 | {r['median_ms']:.3f} ms | {r['p99_ms']:.3f} ms | {r['candidates']} | {goal} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
