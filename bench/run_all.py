"""`make bench`: our loader against the disk and memory limits and the peer loaders,
on a synthetic LLM-shaped checkpoint (default 2 GiB) and on SmolLM2-135M.

Every measurement runs in a fresh interpreter (bench/worker.py); see that file for
what is inside the timed region. Repetitions are interleaved: each repetition runs
every limit and loader once (cold group, warm group, DRAM group, the order inside a
group rotated from one repetition to the next), so slow drift of the shared disk
hits all of them alike. Results: medians over repetitions, JSON under
bench/results/, a markdown table on stdout.

    .venv/bin/python bench/run_all.py                 # default: 2 GiB, 3 repetitions
    .venv/bin/python bench/run_all.py --quick         # 512 MiB, 2 repetitions, no SmolLM2
    .venv/bin/python bench/run_all.py --only cold,ours,safetensors --runs 5
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import limits  # noqa: E402
import report  # noqa: E402
from peers import PEERS  # noqa: E402
from smollm2 import ensure_smollm2  # noqa: E402
from synth import ensure_synthetic  # noqa: E402

CONDS = ("cold", "warm", "dram")
OURS_VARIANTS = {"ours": {"verify": True}, "ours-noverify": {"verify": False},
                 "ours-arena": {"verify": True, "arena": True}}
SMOL_PEERS = ("safetensors", "runai", "fastsafetensors")
RETRIES = 2  # a run spoiled by another process (page cache dropped meanwhile) is run again


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gib", type=float, default=None, help="synthetic checkpoint size (default 2, quick 0.5)")
    p.add_argument("--runs", type=int, default=None, help="repetitions (default 3, quick 2)")
    p.add_argument("--quick", action="store_true", help="512 MiB, 2 repetitions, no SmolLM2")
    p.add_argument("--only", default="", help="comma list of conditions (cold,warm,dram), models "
                   "(synthetic,smollm2) and/or loaders (disk,ours,ours-noverify,ours-arena,"
                   + ",".join(PEERS) + "); each kind given restricts that kind")
    p.add_argument("--no-smol", action="store_true", help="skip the SmolLM2 rows")
    p.add_argument("--workdir", type=Path, default=common.DEFAULT_WORKDIR, help="where checkpoints are cached")
    p.add_argument("--json-out", type=Path, default=None, help="results file (default bench/results/<time>.json)")
    p.add_argument("--settle", type=float, default=2.5,
                   help="seconds to pause after setting the cache state (see worker.py; default 2.5)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.size_gib = args.size_gib or (0.5 if args.quick else 2.0)
    args.runs = args.runs or (2 if args.quick else 3)
    if args.quick:
        args.no_smol = True
    return args


def selection(only: str) -> tuple[set, set, set]:
    words = {w.strip() for w in only.split(",") if w.strip()}
    loaders_all = {"disk", *OURS_VARIANTS, *PEERS}
    unknown = words - set(CONDS) - {"synthetic", "smollm2"} - loaders_all
    if unknown:
        raise SystemExit(f"--only: unknown names {sorted(unknown)}")
    conds = words & set(CONDS) or set(CONDS)
    models = words & {"synthetic", "smollm2"} or {"synthetic", "smollm2"}
    loaders = (words & loaders_all or loaders_all) | {"disk"}  # the limits always run
    return conds, models, loaders


def plan_groups(models: dict, conds: set, loaders: set, can_drop: bool, settle: float) -> list[list[dict]]:
    """Groups of (model, cond, name, spec) in run order; each group's order is rotated per repetition."""
    groups = []
    for model, m in models.items():
        ours_files = [str(f) for f in m["sllm_files"]]
        fmt_files = {"safetensors": [str(m["safetensors"])], "pt": [str(m["pt"])] if m.get("pt") else None}
        fmt_path = {"safetensors": str(m["safetensors"]), "pt": str(m.get("pt"))}
        peer_names = [p for p in PEERS if p in loaders and (model == "synthetic" or p in SMOL_PEERS)]
        for cond in ("cold", "warm"):
            if cond not in conds or (cond == "cold" and not can_drop):
                continue
            items = []
            if cond == "cold" and "disk" in loaders:
                for t in ("disk-fio", "disk-pread"):
                    if t == "disk-fio" and not limits.fio_available():
                        continue
                    items.append((model, cond, t, {"task": t, "cond": "cold", "files": ours_files}))
            for name, opts in OURS_VARIANTS.items():
                if name in loaders and (model == "synthetic" or name != "ours-noverify"):
                    items.append((model, cond, name, {"task": "ours", "cond": cond, "path": str(m["sllm"]),
                                                      "files": ours_files, "opts": opts}))
            for name in peer_names:
                fmt = PEERS[name][0]
                if fmt_files.get(fmt):
                    items.append((model, cond, name, {"task": name, "cond": cond, "path": fmt_path[fmt],
                                                      "files": fmt_files[fmt]}))
            groups.append(items)
        if "dram" in conds and loaders & {"ours", "ours-arena"}:
            groups.append([(model, "dram", "dram", {"task": "dram", "path": str(m["sllm"]), "drop": can_drop})])
    for g in groups:
        for _, _, _, spec in g:
            spec["settle_s"] = settle
    return groups


def run(args: argparse.Namespace) -> dict:
    conds, model_sel, loaders = selection(args.only)
    can_drop, why = common.can_drop_caches()
    if not can_drop:
        log(f"NOTE: {why}")
    if not limits.fio_available():
        log("NOTE: fio is not installed (apt-get install fio): the disk limit is measured with preadv only")
    log("the disk limit is the best of: preadv " + ", ".join(f"{t} threads x {s >> 20} MiB" for t, s in
                                                            limits.PREAD_PROBES)
        + ("; fio " + ", ".join(f"QD{d} x {j} jobs" for d, j in limits.FIO_PROBES) if limits.fio_available() else ""))
    models = {}
    if "synthetic" in model_sel:
        s = ensure_synthetic(args.workdir, int(args.size_gib * 2**30), args.seed, progress=log)
        models["synthetic"] = {"sllm": s.sllm, "sllm_files": s.sllm_data_files(), "safetensors": s.safetensors,
                               "pt": s.pt, "tensors": len(s.spec.shapes()), "payload_bytes": s.payload_bytes,
                               "spec": s.spec.__dict__}
    if "smollm2" in model_sel and not args.no_smol:
        sm = ensure_smollm2(args.workdir, progress=log)
        if sm is not None:
            models["smollm2"] = {"sllm": sm.sllm, "sllm_files": sm.sllm_data_files(), "safetensors": sm.safetensors}
    groups = plan_groups(models, conds, loaders, can_drop, args.settle)
    per_rep = sum(len(g) for g in groups)
    log(f"{per_rep} measurements per repetition, {args.runs} repetitions")
    records = []
    t_start = time.perf_counter()
    for rep in range(args.runs):
        for gi, group in enumerate(groups):
            k = (rep + gi) % len(group) if group else 0
            for model, cond, name, spec in group[k:] + group[:k]:
                spec = dict(spec, rep=rep)
                if name == "dram":
                    items = ["memcpy", "memcpy-fresh", "memcpy-fresh-4k", "ours-dram", "ours-dram-arena"]
                    spec["order"] = items[rep % len(items):] + items[:rep % len(items)]
                for attempt in range(1 + RETRIES):
                    res = common.run_worker(spec)
                    records.append({"rep": rep, "model": model, "cond": cond, "name": name, "attempt": attempt,
                                    "result": res})
                    log(f"[rep {rep + 1}/{args.runs} {time.perf_counter() - t_start:6.0f}s] {model:9} {cond:4} "
                        f"{name:16} {_brief(res)}")
                    if "invalid" not in res:
                        break
    summary = report.summarize(records)
    return {"meta": meta(args, models, can_drop, why), "records": records, "summary": summary}


def _brief(res: dict) -> str:
    if "error" in res:
        return "ERROR " + res["error"][:200]
    if "invalid" in res:
        return "INVALID (retried): " + res["invalid"]
    if "probes" in res:
        return f"best {res['bytes'] / res['seconds'] / 1e9:.2f} GB/s ({res['tool']}); " + \
            ", ".join(f"{p['gbps']:.2f}" for p in res["probes"])
    if "items" in res:
        return "  ".join(f"{k} {v['bytes'] / v['seconds'] / 1e9:.2f}" for k, v in res["items"].items()) + " GB/s"
    s = f"{res['bytes'] / res['seconds'] / 1e9:6.2f} GB/s ({res['seconds']:.3f} s)"
    if res.get("materialized_tensors"):
        s += f", lazy part {res['load_s']:.3f} s"
    if "stages" in res:
        st = res["stages"]
        s += f", direct {st.get('bytes_direct', 0) / 1e9:.2f} GB, verify-thread {st.get('verify_thread_s', 0):.2f} s"
    return s


def meta(args, models, can_drop, why) -> dict:
    def git(*a):
        try:
            return subprocess.run(["git", *a], capture_output=True, text=True, cwd=common.REPO).stdout.strip()
        except OSError:
            return ""
    fio = subprocess.run(["fio", "--version"], capture_output=True, text=True).stdout.strip() \
        if limits.fio_available() else None
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "git_commit": git("rev-parse", "--short", "HEAD"), "git_dirty": bool(git("status", "--porcelain")),
        "machine": common.machine_info(), "fio": fio, "drop_caches": can_drop, "drop_caches_note": why,
        "models": {k: {kk: (str(vv) if isinstance(vv, Path) else vv) for kk, vv in v.items() if kk != "sllm_files"}
                   for k, v in models.items()},
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    with common.exclusive_bench("bench/run_all.py", wait_note=log):
        t0 = time.perf_counter()  # after any wait for another benchmark
        out = run(args)
    out["meta"]["elapsed_s"] = round(time.perf_counter() - t0, 1)
    path = args.json_out or common.RESULTS_DIR / f"bench-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str))
    m = out["meta"]
    print(f"\nsllm loader benchmark, {m['date']}, commit {m['git_commit']}{' (dirty)' if m['git_dirty'] else ''}; "
          f"{m['machine']}; synthetic {args.size_gib} GiB, {args.runs} repetitions; {m['elapsed_s']:.0f} s\n")
    print(report.markdown(out["summary"]))
    print(f"\nJSON: {path}")
    if out["summary"]["limit_violations"]:
        log("INVALID RUN: a loader beat its limit (see the table's first lines); its ratios mean nothing")
    return 1 if out["summary"]["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
