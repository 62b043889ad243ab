"""The cluster simulator's benchmark (issue 11): placement policies on the paper's setting, and
the scheduler's decision time as the cluster grows.

1. examples/sim/paper.toml (4 servers x 4 GPUs, OPT-6.7B/13B/30B replicas) with GSM8K- and
   ShareGPT-like lengths over its RPS sweep: mean and P99 startup latency (arrival to first
   token) per policy, averaged over --seeds seeds, and as ratios to ours (> 1: ours is faster).
2. Decision time per request (policy.decide: place() and its hooks, wall clock, median and
   P99) at 4, 100 and 1,000 servers (examples/sim/large.toml scaled down: ~10 models per server).

Prints markdown tables; --json FILE writes everything; --plot PNG draws latency vs RPS.

    .venv/bin/python bench/sim_bench.py [--seeds 3] [--plot bench/sim_latency_vs_rps.png] [--json out.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sllmd.cluster.sim import load, report  # noqa: E402
from sllmd.cluster.sim.engine import simulate  # noqa: E402

DATASETS = ("gsm8k", "sharegpt")


def policy_sweep(seeds: int, duration: float | None) -> list[dict]:
    base = load(ROOT / "examples" / "sim" / "paper.toml")
    if duration:
        base = base.with_(duration_s=duration)
    rows = []
    for ds in DATASETS:
        sc = base.with_(workload=dataclasses.replace(base.workload, lengths=ds))
        for rps in sc.rps:
            for policy in sc.policies:
                means, p99s, migr, pre = [], [], [], []
                for seed in range(1, seeds + 1):
                    s = report.summarize(simulate(sc.with_(seed=seed), policy, rps))
                    means.append(s["startup_s"]["mean"])
                    p99s.append(s["startup_s"]["p99"])
                    migr.append(s["migrations"])
                    pre.append(s["preemptions"])
                rows.append({"dataset": ds, "rps": rps, "policy": policy, "mean_s": statistics.fmean(means),
                             "p99_s": statistics.fmean(p99s), "migrations": statistics.fmean(migr),
                             "preemptions": statistics.fmean(pre)})
                print(f"  {ds} rps={rps:g} {policy}: mean {rows[-1]['mean_s']:.2f} s, P99 {rows[-1]['p99_s']:.2f} s",
                      file=sys.stderr)
    ours = {(r["dataset"], r["rps"]): r for r in rows if r["policy"] == "ours"}
    for r in rows:
        o = ours[(r["dataset"], r["rps"])]
        r["mean_ratio"] = r["mean_s"] / o["mean_s"]
        r["p99_ratio"] = r["p99_s"] / o["p99_s"]
    return rows


def scaled(servers: int):
    """large.toml with `servers` servers and every (1000/servers)-th of its models (~10 per server)."""
    sc = load(ROOT / "examples" / "sim" / "large.toml")
    if servers == 4:
        return load(ROOT / "examples" / "sim" / "paper.toml"), 1.0
    step = max(1, round(sc.servers.count / servers))
    return (sc.with_(servers=dataclasses.replace(sc.servers, count=servers), models=sc.models[::step]),
            servers / 10.0)


def decision_times(sizes: list[int], duration: float) -> list[dict]:
    out = []
    for n in sizes:
        sc, rps = scaled(n)
        sc = sc.with_(duration_s=duration if n > 4 else max(duration, 300.0))
        for policy in ("ours", "locality", "load-only"):
            t0 = time.perf_counter()
            res = simulate(sc, policy, rps)
            wall = time.perf_counter() - t0
            dec = sorted(res["decision_s"])
            out.append({"servers": n, "models": len(sc.models), "policy": policy, "decisions": len(dec),
                        "median_ms": statistics.median(dec) * 1e3, "p99_ms": report.percentile(dec, 99) * 1e3,
                        "run_s": wall})
            print(f"  {n} servers {policy}: {len(dec)} decisions, median {out[-1]['median_ms']:.3f} ms",
                  file=sys.stderr)
    return out


def plot(rows: list[dict], path: str) -> None:
    plt = report._pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), constrained_layout=True)
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    for i, ds in enumerate(DATASETS):
        for j, (key, label) in enumerate((("mean_s", "mean"), ("p99_s", "P99"))):
            ax = axes[i][j]
            for p in policies:
                pts = sorted((r["rps"], r[key]) for r in rows if r["dataset"] == ds and r["policy"] == p)
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=p,
                        linewidth=2.6 if p == "ours" else 1.3, linestyle="--" if p == "oracle" else "-")
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title(f"{ds}-like lengths: {label} startup latency")
            ax.set_xlabel("requests per second")
            ax.set_ylabel("seconds")
    axes[0][1].legend(fontsize=8)
    fig.suptitle("Simulated paper setting (4 servers x 4 GPUs, OPT-6.7B/13B/30B replicas), real placement code")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3, help="seeds averaged per point (default 3)")
    ap.add_argument("--duration", type=float, help="arrival window of the policy runs (default: the example's)")
    ap.add_argument("--servers", type=int, nargs="+", default=[4, 100, 1000])
    ap.add_argument("--decision-duration", type=float, default=20.0, help="arrival window of the scale runs")
    ap.add_argument("--plot", metavar="PNG", help="latency vs RPS per policy")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    print("sim_bench: policies on the paper's setting", file=sys.stderr)
    rows = policy_sweep(args.seeds, args.duration)
    print("sim_bench: decision time vs cluster size", file=sys.stderr)
    scale = decision_times(args.servers, args.decision_duration)

    print(f"### Policies on the paper's setting (mean over {args.seeds} seeds)\n")
    print("| lengths | rps | policy | startup mean | P99 | mean / ours | P99 / ours | migrations | preemptions |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['dataset']} | {r['rps']:g} | {r['policy']} | {r['mean_s']:.2f} s | {r['p99_s']:.2f} s "
              f"| {r['mean_ratio']:.2f} | {r['p99_ratio']:.2f} | {r['migrations']:.1f} | {r['preemptions']:.1f} |")
    print("\n### Decision time per request (policy.decide: place() and hooks)\n")
    print("| servers | models | policy | decisions | median | P99 | goal |")
    print("|---:|---:|---|---:|---:|---:|---|")
    for s in scale:
        goal = ("< 1 ms: " + ("met" if s["median_ms"] < 1.0 else "missed")) if s["servers"] >= 1000 else ""
        print(f"| {s['servers']} | {s['models']} | {s['policy']} | {s['decisions']} | {s['median_ms']:.3f} ms "
              f"| {s['p99_ms']:.3f} ms | {goal} |")
    if args.plot:
        plot(rows, args.plot)
        print(f"\nplot: {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps({"policies": rows, "decision_time": scale}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
