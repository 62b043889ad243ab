"""Cluster figures on loopback (issue 8): forwarding overhead and state propagation.

Three real sllmd nodes with their Serf agents (tests/cluster_helpers.py). The model is
loaded on B only.

- forwarding: TTFT and decode tokens/s asked of A (placed on B, relayed) vs asked of B
  directly, alternating, medians of --runs. Goals: >= 0.95x tokens/s, TTFT + <= 2 ms.
- propagation: B evicts the model from its DRAM (a tier change); the time until A's view of
  B (`sllmctl nodes --json`'s state, i.e. what A's placement reads) shows it. Goal: < 1 s.

    .venv/bin/python bench/cluster_bench.py [--runs 5] [--max-tokens 48]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(1, str(BENCH.parent / "tests"))

from daemon_bench import NAME, QUESTION, smollm2_fixtures, timed_infer  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _b_state(ca) -> dict:
    """B's state as A's placement reads it (A's `nodes`, through a client kept open: polling
    with a fresh `sllmctl` process would add its start-up to every sample)."""
    rows = {r["name"]: r for r in ca.nodes()}
    return (rows.get("B") or {}).get("state") or {}


def _tiers_on_b(ca) -> list[str] | None:
    for m in _b_state(ca).get("models") or []:
        if m.get("name") == NAME:
            return list(m.get("tiers") or [])
    return None


def forwarding(a, b, runs: int, max_tokens: int) -> dict:
    via, direct = [], []
    with a.client() as ca, b.client() as cb:
        timed_infer(cb, QUESTION, max_tokens)   # warm both paths
        timed_infer(ca, QUESTION, max_tokens)
        for _ in range(runs):
            r = timed_infer(ca, QUESTION, max_tokens)
            node = ((r["daemon"] or {}).get("placement") or {}).get("node")
            if node != "B":
                raise SystemExit(f"A placed the request on {node}, not B")
            via.append(r)
            direct.append(timed_infer(cb, QUESTION, max_tokens))
    med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
    for label, rs in (("direct", direct), ("relayed", via)):   # where the time goes, from the daemons' stats
        pl = [(r["daemon"] or {}).get("placement") or {} for r in rs]
        engine = [(r["daemon"] or {}).get("ttft_s") for r in rs]
        log(f"{label}: coordinator place {statistics.median(p.get('place_ms', 0) for p in pl):.2f} ms, "
            f"first event {statistics.median(p.get('first_event_ms', 0) for p in pl):.2f} ms, "
            f"engine ttft {statistics.median(e for e in engine if e is not None) * 1e3 if any(engine) else 0:.2f} ms, "
            f"client ttft {med(rs, 'ttft_s') * 1e3:.2f} ms")
    return {"ttft_direct_ms": med(direct, "ttft_s") * 1e3, "ttft_relayed_ms": med(via, "ttft_s") * 1e3,
            "tps_direct": med(direct, "tokens_per_s"), "tps_relayed": med(via, "tokens_per_s"), "runs": runs}


def propagation(a, b, repeats: int) -> list[float]:
    times = []
    with b.client() as cb, a.client() as ca:
        for _ in range(repeats):
            cb.load(NAME)
            cb.evict(NAME, tier="device")
            deadline = time.monotonic() + 30
            while "dram" not in (_tiers_on_b(ca) or []):
                if time.monotonic() > deadline:
                    raise SystemExit("A never saw B's DRAM copy")
                time.sleep(0.05)
            t0 = time.perf_counter()
            cb.evict(NAME, tier="dram")
            while "dram" in (_tiers_on_b(ca) or []):
                if time.perf_counter() - t0 > 30:
                    raise SystemExit("A never saw B's DRAM eviction")
                time.sleep(0.005)
            times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--propagation-repeats", type=int, default=5)
    a_ = p.parse_args(argv)
    from cluster_helpers import BENCH_FLAGS, close_all, make_nodes, start_all
    from daemon_helpers import remove_tree, short_tempdir

    ckpt, _ = smollm2_fixtures()
    root = short_tempdir("sllm-clbench-")
    nodes = a, b, c = make_nodes(root, ["A", "B", "C"], *BENCH_FLAGS, dram="1GiB", device_memory="1GiB")
    try:
        start_all(nodes)
        with b.client() as cb:
            cb.import_model(NAME, str(ckpt))
            cb.load(NAME)
        deadline = time.monotonic() + 30
        with a.client() as ca:
            while _tiers_on_b(ca) is None:
                if time.monotonic() > deadline:
                    raise SystemExit("A never pulled B's state")
                time.sleep(0.1)
        f = forwarding(a, b, a_.runs, a_.max_tokens)
        prop = propagation(a, b, a_.propagation_repeats)
    finally:
        close_all(nodes)
        remove_tree(root)
    ratio = f["tps_relayed"] / f["tps_direct"]
    extra_ms = f["ttft_relayed_ms"] - f["ttft_direct_ms"]
    print("| figure | direct (B) | relayed (A -> B) | result | goal |")
    print("|---|---|---|---|---|")
    print(f"| TTFT, median of {f['runs']} | {f['ttft_direct_ms']:.1f} ms | {f['ttft_relayed_ms']:.1f} ms "
          f"| +{extra_ms:.2f} ms | <= +2 ms |")
    print(f"| decode tokens/s, median of {f['runs']} | {f['tps_direct']:.1f} | {f['tps_relayed']:.1f} "
          f"| {ratio:.3f}x | >= 0.95x |")
    print(f"| tier change on B -> seen in A's view, median of {len(prop)} | | | "
          f"{statistics.median(prop) * 1e3:.0f} ms (max {max(prop) * 1e3:.0f}) | < 1 s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
