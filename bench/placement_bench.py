"""Placement decision time over many simulated node states (goal: < 1 ms for 1,000 nodes).

Each simulated node holds 50 models spread over its tiers (a few loaded with queued requests,
some in DRAM, the rest on SSD), its own measured bandwidths and queue delay; some views are
stale, a few nodes failed. Prints a markdown table: per cluster size, the median and p99 of one
place() call for a model that ~1/3 of the nodes hold; "fetching" rows give every node peer and
repository bandwidths too (every node is then a candidate: the ranked path).

    .venv/bin/python bench/placement_bench.py [--nodes 10 100 1000] [--repeat 450]
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


def simulated_views(n: int, rng: random.Random, now: float, fetching: bool = False) -> list[NodeView]:
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
        if fetching:
            state["bandwidths"].update(peer_ssd=1.25 * GB, repo_ssd=rng.choice((0.5, 1.25)) * GB)
        status = "failed" if rng.random() < 0.02 else "alive"
        age = rng.uniform(0, 3) if rng.random() > 0.05 else 30.0
        views.append(NodeView(f"node-{i:04d}", status, state, 1, now - age))
    return views


def measure(n: int, repeat: int, seed: int = 1, fetching: bool = False) -> dict:
    """place() times over one set of states: `first` is each model's first decision on them
    (place() memoizes per state and model what depends on that state alone), `again` the later
    ones. The index of the states themselves is built by one call before timing."""
    rng = random.Random(seed)
    now = time.monotonic()
    views = simulated_views(n, rng, now, fetching)
    repository = {m: 4 * GB for m in MODELS} if fetching else None
    t0 = time.perf_counter()
    place("no-such-model", views, now)
    index_ms = (time.perf_counter() - t0) * 1e3
    first, again = [], []
    for k in range(max(repeat, len(MODELS))):
        model = MODELS[k % len(MODELS)]
        t0 = time.perf_counter()
        decision = place(model, views, now, prefer="node-0000", repository=repository)
        (first if k < len(MODELS) else again).append(time.perf_counter() - t0)
    churn = []     # each decision after one node's new state (a new pull): re-indexed inside place()
    for k in range(len(MODELS)):
        i = rng.randrange(n)
        old = views[i]
        views[i] = NodeView(old.name, old.status, dict(old.state, models=[dict(m) for m in old.state["models"]]),
                            old.version + 1, old.fetched_at)
        t0 = time.perf_counter()
        place(MODELS[k], views, now, prefer="node-0000", repository=repository)
        churn.append(time.perf_counter() - t0)
    return {"nodes": n, "index_ms": index_ms, "churn_ms": statistics.median(churn) * 1e3,
            "first_ms": statistics.median(first) * 1e3,
            "median_ms": statistics.median(again or first) * 1e3,
            "p99_ms": sorted(again or first)[min(len(again or first) - 1, int(len(again or first) * 0.99))] * 1e3,
            "candidates": len(decision.candidates)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--repeat", type=int, default=450, help="decisions per size (the first 150: one per model)")
    args = ap.parse_args(argv)
    print("| nodes | models/node | fetching | first call (indexes every state) | a model's first decision "
          "| later decisions: median | p99 | one state changed before each: median | candidates | goal |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---|")
    for fetching in (False, True):
        for n in args.nodes:
            r = measure(n, args.repeat, fetching=fetching)
            worst = max(r["median_ms"], r["first_ms"], r["churn_ms"])
            goal = ("< 1 ms: " + ("met" if worst < 1.0 else "missed")) if n == 1000 else ""
            print(f"| {n} | 50 | {'every node' if fetching else 'none'} | {r['index_ms']:.1f} ms | {r['first_ms']:.3f} ms "
                  f"| {r['median_ms']:.3f} ms | {r['p99_ms']:.3f} ms | {r['churn_ms']:.3f} ms | {r['candidates']} | {goal} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
