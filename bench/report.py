"""Turning per-run records into medians, ratios, target checks and a markdown table.

A record: {"rep", "model", "cond", "name", "result": {...worker output...}}.
GB/s are decimal (1e9 bytes/s) of the bytes each run materialized (for the disk
limits: the bytes read). Ratios are given two ways: of the medians, and the
median of per-repetition ratios (paired: the two runs of a pair ran minutes
apart at most, which cancels much of the disk's drift).
"""
from __future__ import annotations

from collections import defaultdict

from common import gbps, median

OURS = ("ours", "ours-noverify", "ours-arena")
PEER_NAMES = ("safetensors", "torch.load", "torch.load-mmap", "runai", "fastsafetensors")
DISK = ("disk-fio", "disk-pread")
COND_ORDER = {"cold": 0, "warm": 1, "dram": 2}

LABELS = {
    "disk-limit": "disk limit (best of every fio and preadv probe)",
    "disk-fio": "  fio O_DIRECT libaio 16M, best of QD 8-32 x 1-8 jobs",
    "disk-pread": "  preadv O_DIRECT, best of 4-16 threads x 4/16M (huge pages)",
    "ours": "ours load_state_dict (verify)",
    "ours-noverify": "ours load_state_dict (verify=False)",
    "ours-arena": "ours load_state_dict (verify, pre-faulted arena)",
    "safetensors": "safetensors.load_file + clone",
    "safetensors-lazy": "  safetensors.load_file, lazy mmap (not read)",
    "torch.load": "torch.load(mmap=False)",
    "torch.load-mmap": "torch.load(mmap=True) + clone",
    "torch.load-mmap-lazy": "  torch.load(mmap=True), lazy mmap (not read)",
    "runai": "runai SafetensorsStreamer",
    "fastsafetensors": "fastsafetensors (nogds, cpu)",
    "memcpy": "memcpy limit (pre-faulted dst, fastest of 3)",
    "memcpy-fresh": "memcpy into fresh memory (huge pages requested)",
    "memcpy-fresh-4k": "memcpy into fresh memory (4 KiB pages)",
    "ours-dram": "ours DRAM tier -> CPU tensors (fresh buffers)",
    "ours-dram-arena": "ours DRAM tier -> CPU tensors (pre-faulted arena)",
    "fill": "  (SSD -> DRAM tier fill, cold, verify)",
}


def per_rep_rates(records: list[dict]) -> dict[tuple[str, str, str], dict[int, float]]:
    """(model, cond, name) -> {rep: GB/s}; DRAM items unpacked; lazy lines and the disk limit added."""
    rates: dict[tuple, dict[int, float]] = defaultdict(dict)
    for r in records:
        res = r["result"]
        if "error" in res or "invalid" in res:
            continue
        key = (r["model"], r["cond"], r["name"])
        if r["name"] == "dram":
            for item, v in res["items"].items():
                rates[(r["model"], "dram", item)][r["rep"]] = gbps(v["bytes"], v["seconds"])
            continue
        rates[key][r["rep"]] = gbps(res["bytes"], res["seconds"])
        if res.get("materialized_tensors"):
            rates[(r["model"], r["cond"], r["name"] + "-lazy")][r["rep"]] = gbps(res["bytes"], res["load_s"])
    for (model, cond, name) in list(rates):
        if name == "disk-fio" or name == "disk-pread":
            lim = rates[(model, cond, "disk-limit")]
            for rep, v in rates[(model, cond, name)].items():
                lim[rep] = max(lim.get(rep, 0.0), v)
    return rates


def _paired(a: dict[int, float], b: dict[int, float]) -> float | None:
    return median([a[k] / b[k] for k in a if k in b and b[k]])


def summarize(records: list[dict]) -> dict:
    rates = per_rep_rates(records)
    rows = []
    errors = [f"{r['model']} {r['cond']} {r['name']} rep {r['rep']}: {r['result']['error']}"
              for r in records if "error" in r["result"]]
    invalid = [f"{r['model']} {r['cond']} {r['name']} rep {r['rep']}: {r['result']['invalid']}"
               for r in records if "invalid" in r["result"]]
    for (model, cond, name), by_rep in sorted(rates.items(), key=lambda kv: _sort_key(kv[0])):
        vals = list(by_rep.values())
        row = {"model": model, "cond": cond, "name": name, "label": LABELS.get(name, name),
               "gbps_median": median(vals), "gbps_min": min(vals), "gbps_max": max(vals), "n": len(vals),
               "gbps_runs": [round(by_rep[k], 3) for k in sorted(by_rep)]}
        limit_name = "disk-limit" if cond == "cold" else "memcpy"
        limit = rates.get((model, cond if cond == "cold" else "dram", limit_name))
        if limit and name not in ("disk-limit", "memcpy") and not name.startswith("disk"):
            row["vs_limit"] = row["gbps_median"] / median(list(limit.values()))
            row["vs_limit_paired"] = _paired(by_rep, limit)
            row["limit"] = limit_name
        rows.append(row)
    speedups = []
    for (model, cond, name), by_rep in rates.items():
        if name not in OURS or cond == "dram":
            continue
        for peer in PEER_NAMES:
            other = rates.get((model, cond, peer))
            if other:
                speedups.append({"model": model, "cond": cond, "ours": name, "peer": peer,
                                 "ratio": median(list(by_rep.values())) / median(list(other.values())),
                                 "ratio_paired": _paired(by_rep, other)})
    return {"rows": rows, "speedups": speedups, "targets": targets(rows, speedups), "errors": errors,
            "invalid": invalid, "limit_violations": limit_violations(rates)}


def limit_violations(rates: dict) -> list[str]:
    """Every repetition in which a loader beat its limit (cold: the disk limit; DRAM: memcpy
    into pre-faulted memory). A limit that is beaten is not an upper bound: the run is invalid."""
    out = []
    for (model, cond, name), by_rep in sorted(rates.items(), key=lambda kv: _sort_key(kv[0])):
        if cond == "cold" and not name.startswith("disk") and not name.endswith("-lazy"):
            limit_name = "disk-limit"
        elif cond == "dram" and name.startswith("ours-dram"):
            limit_name = "memcpy"
        else:
            continue
        limit = rates.get((model, cond, limit_name), {})
        for rep, v in sorted(by_rep.items()):
            if rep in limit and v > limit[rep]:
                out.append(f"{model} {cond} {name} rep {rep}: {v:.2f} GB/s > {limit_name} {limit[rep]:.2f} GB/s")
    return out


def _sort_key(key):
    model, cond, name = key
    order = ["disk-limit", "disk-fio", "disk-pread", "memcpy", "memcpy-fresh", "memcpy-fresh-4k", "ours", "ours-noverify",
             "ours-arena", "ours-dram", "ours-dram-arena", "fill", "safetensors", "safetensors-lazy", "torch.load",
             "torch.load-mmap", "torch.load-mmap-lazy", "runai", "fastsafetensors"]
    return (model != "synthetic", model, COND_ORDER.get(cond, 9), order.index(name) if name in order else 99, name)


def targets(rows: list[dict], speedups: list[dict]) -> list[dict]:
    """The issue's targets, checked on the synthetic checkpoint (and SmolLM2 where measured)."""
    out = []
    by = {(r["model"], r["cond"], r["name"]): r for r in rows}
    for model in sorted({r["model"] for r in rows}):
        for name in ("ours", "ours-arena"):
            r = by.get((model, "cold", name))
            if r and "vs_limit" in r:
                out.append(_target(f"{model}: cold {name} >= 0.9x disk limit", r["vs_limit"], 0.9,
                                   r.get("vs_limit_paired")))
        for name in ("ours-dram", "ours-dram-arena"):
            r = by.get((model, "dram", name))
            if r and "vs_limit" in r:
                out.append(_target(f"{model}: DRAM tier -> CPU ({name}) >= 0.7x memcpy", r["vs_limit"], 0.7,
                                   r.get("vs_limit_paired")))
        for cond in ("cold", "warm"):
            for name in ("ours", "ours-arena"):
                mine = [s for s in speedups if s["model"] == model and s["cond"] == cond and s["ours"] == name]
                if mine:
                    worst = min(mine, key=lambda s: s["ratio"])
                    out.append(_target(f"{model}: {cond} {name} faster than every peer (slowest margin: "
                                       f"vs {worst['peer']})", worst["ratio"], 1.0, worst["ratio_paired"]))
    return out


def _target(what: str, value: float, need: float, paired: float | None) -> dict:
    return {"target": what, "value": value, "paired": paired, "need": need, "met": value >= need}


def _f(x, fmt="{:.2f}"):
    return "-" if x is None else fmt.format(x)


def markdown(summary: dict) -> str:
    lines = []
    if summary.get("limit_violations"):
        lines += ["**INVALID RUN: a loader beat its limit, so the limit is not an upper bound and the "
                  "ratios to it mean nothing:**", ""] + [f"- {v}" for v in summary["limit_violations"]] + [""]
    lines += ["| model | condition | loader | GB/s (median) | min-max | runs | vs limit (paired) |",
              "|---|---|---|---:|---:|---:|---:|"]
    for r in summary["rows"]:
        vs = f"{_f(r.get('vs_limit'))}x {r.get('limit', '')} ({_f(r.get('vs_limit_paired'))})" \
            if "vs_limit" in r else ""
        lines.append(f"| {r['model']} | {r['cond']} | {r['label']} | {_f(r['gbps_median'])} | "
                     f"{_f(r['gbps_min'])}-{_f(r['gbps_max'])} | {r['n']} | {vs} |")
    lines += ["", "Ours / peer (GB/s ratio of medians; paired per-repetition median in parentheses):", "",
              "| model | condition | ours | " + " | ".join(PEER_NAMES) + " |",
              "|---|---|---|" + "---:|" * len(PEER_NAMES)]
    groups = defaultdict(dict)
    for s in summary["speedups"]:
        groups[(s["model"], s["cond"], s["ours"])][s["peer"]] = s
    for (model, cond, ours), peers in sorted(groups.items(), key=lambda kv: (kv[0][0] != "synthetic", kv[0][0],
                                                                           COND_ORDER[kv[0][1]], kv[0][2])):
        cells = [f"{_f(peers[p]['ratio'])}x ({_f(peers[p]['ratio_paired'])})" if p in peers else "-"
                 for p in PEER_NAMES]
        lines.append(f"| {model} | {cond} | {ours} | " + " | ".join(cells) + " |")
    lines += ["", "Targets:", ""]
    for t in summary["targets"]:
        mark = "met" if t["met"] else "MISSED"
        lines.append(f"- {t['target']}: {_f(t['value'])} (paired {_f(t['paired'])}), need >= {t['need']} -> {mark}")
    if summary.get("invalid"):
        lines += ["", "Runs discarded and repeated (another process disturbed the page cache):", ""]
        lines += [f"- {e}" for e in summary["invalid"]]
    if summary["errors"]:
        lines += ["", "Errors:", ""] + [f"- {e}" for e in summary["errors"]]
    return "\n".join(lines)
