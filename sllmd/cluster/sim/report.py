"""Summaries of runs (mean, P50, P99 of startup and end-to-end latency; paths; migrations),
ratios to "ours", a text table, and a PNG plot of latency vs RPS (matplotlib, imported lazily:
`pip install 'sllmd[sim]'`)."""
from __future__ import annotations

import collections
import math
import statistics

from sllmd.errors import ConfigError


def percentile(sorted_values: list[float], p: float) -> float | None:
    """Nearest-rank percentile of an ascending list (None when empty)."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, math.ceil(p / 100.0 * len(sorted_values)) - 1))
    return sorted_values[k]


def stats(values: list[float]) -> dict:
    v = sorted(values)
    return {"mean": statistics.fmean(v) if v else None, "p50": percentile(v, 50), "p99": percentile(v, 99),
            "max": v[-1] if v else None}


def summarize(result: dict) -> dict:
    rows = result["rows"]
    done = [r for r in rows if r["end"] is not None and r["first_token"] is not None]
    dec = sorted(result.get("decision_s") or [])
    return {
        "requests": len(rows), "completed": len(done),
        "startup_s": stats([r["first_token"] - r["arrival"] for r in done]),
        "e2e_s": stats([r["end"] - r["arrival"] for r in done]),
        "paths": dict(sorted(collections.Counter(r["path"] for r in rows).items())),
        **result["counts"],
        "decision_ms": {"median": statistics.median(dec) * 1e3 if dec else None,
                        "p99": percentile(dec, 99) * 1e3 if dec else None},
    }


def ratios(runs: list[dict], base: str = "ours") -> list[dict]:
    """Per run, its mean and P99 startup latency over base's at the same RPS (> 1: base is faster)."""
    ref = {r["rps"]: r["summary"]["startup_s"] for r in runs if r["policy"] == base}
    out = []
    for r in runs:
        b, s = ref.get(r["rps"]), r["summary"]["startup_s"]
        if b is None or r["policy"] == base:
            continue

        def q(key):
            return s[key] / b[key] if b[key] and s[key] is not None else None
        out.append({"policy": r["policy"], "rps": r["rps"], "mean_ratio": q("mean"), "p99_ratio": q("p99")})
    return out


def _f(x, fmt="{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def table(report: dict) -> str:
    """A markdown table: one row per (rps, policy)."""
    lines = ["| rps | policy | startup mean | P50 | P99 | e2e mean | P99 | migr. | preempt. | paths | decision median |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in sorted(report["runs"], key=lambda r: (r["rps"], r["policy"])):
        s = r["summary"]
        paths = " ".join(f"{k}:{v}" for k, v in s["paths"].items())
        lines.append(f"| {r['rps']:g} | {r['policy']} | {_f(s['startup_s']['mean'])} s | {_f(s['startup_s']['p50'])} s "
                     f"| {_f(s['startup_s']['p99'])} s | {_f(s['e2e_s']['mean'])} s | {_f(s['e2e_s']['p99'])} s "
                     f"| {s['migrations']} | {s['preemptions']} | {paths} "
                     f"| {_f(s['decision_ms']['median'], '{:.3f}')} ms |")
    if report.get("ratios"):
        lines += ["", "| rps | policy | mean startup / ours | P99 startup / ours |", "|---:|---|---:|---:|"]
        for q in sorted(report["ratios"], key=lambda q: (q["rps"], q["policy"])):
            lines.append(f"| {q['rps']:g} | {q['policy']} | {_f(q['mean_ratio'])} | {_f(q['p99_ratio'])} |")
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'sllmd[sim]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot(report: dict, path: str, title: str | None = None) -> str:
    """Mean and P99 startup latency vs RPS, one line per policy; written as a PNG to `path`."""
    plt = _pyplot()
    runs = report["runs"]
    policies = list(dict.fromkeys(r["policy"] for r in runs))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for ax, key, label in ((axes[0], "mean", "mean"), (axes[1], "p99", "P99")):
        for p in policies:
            pts = sorted((r["rps"], r["summary"]["startup_s"][key]) for r in runs
                         if r["policy"] == p and r["summary"]["startup_s"][key] is not None)
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o",
                        linewidth=2.4 if p == "ours" else 1.4, label=p,
                        linestyle="--" if p == "oracle" else "-")
        ax.set_xlabel("requests per second")
        ax.set_ylabel(f"{label} startup latency (s)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(loc="best", fontsize=8)
    fig.suptitle(title or f"{report['scenario']}: startup latency (arrival to first token) vs RPS")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
