"""One measurement in a fresh interpreter (run by run_all.py; argv[1] is a JSON spec).

Outside the timed region: interpreter start-up, imports, a tiny torch warm-up,
pre-faulting memory a daemon would have pre-faulted at start (ours with an
arena, the DRAM pool), then the cache condition: cold = sync + drop the page
cache; warm = read the files through the page cache, pause, then read again
whatever the VM's DAMON pageout scheme took meanwhile (a few MB), so that
mincore() reports them fully resident when the clock starts. The pause, settle_s
(default 2.5 s), follows every cache state change. The pause matters
on this VM: the guest reports freed memory to the host after ~2 s (free page
reporting), and touching such memory again runs at ~0.5-0.8 GB/s instead of
~10 GB/s. Without the pause, a loader that runs right after a process freed
gigabytes would get memory that is still backed: run order would decide results.

Timed region ("load"): the loader's call that returns the dict of CPU tensors;
then ("materialize") the copy of any tensor that still points into a file
mapping (see peers.py). seconds = load + materialize.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import common
import limits
import loader_bench
import peers


def _condition(cond: str, files: list[Path], settle_s: float) -> dict:
    if cond == "cold":
        common.drop_caches()
    elif cond == "warm":
        common.make_resident(files, refresh=True)
    time.sleep(settle_s)
    if cond == "warm":  # refill what the VM's DAMON pageout took during the pause (a few MB)
        common.make_resident(files)
    res = [common.resident_bytes(f) for f in files]
    return {"resident_bytes": sum(r[0] for r in res), "file_bytes": sum(r[1] for r in res)}


def _loader_run(spec: dict) -> dict:
    task, path = spec["task"], Path(spec["path"])
    files = [Path(f) for f in spec["files"]]
    opts = spec.get("opts", {})
    import torch
    torch.empty(16).clone()  # first-op initialisation, common to all loaders
    timer = arena = None
    if task == "ours":
        loader_bench.prepare_ours()
        timer = loader_bench.StageTimer()
        if opts.get("arena"):
            arena = loader_bench.prefaulted_arena(loader_bench.checkpoint_bytes(path))
        load = lambda: loader_bench.load_ours(path, opts.get("verify", True), arena, timer)  # noqa: E731
    else:
        _, prepare, fn, _ = peers.PEERS[task]
        prepare()
        load = lambda: fn(path)  # noqa: E731
    state = _condition(spec["cond"], files, spec.get("settle_s", 2.5))
    drops = common.drop_count()
    t0 = time.perf_counter()
    sd = load()
    t1 = time.perf_counter()
    copied, copied_bytes = peers.materialize(sd, files)
    t2 = time.perf_counter()
    invalid = _invalid(spec["cond"], state, drops, timer)
    out = {
        "seconds": t2 - t0, "load_s": t1 - t0, "materialize_s": t2 - t1,
        "bytes": peers.unique_bytes(sd), "tensors": len(sd),
        "materialized_tensors": copied, "materialized_bytes": copied_bytes,
        "still_mapped": peers.still_mapped(sd, files), **state,
    }
    if timer is not None:
        out["stages"] = timer.summary()
    if invalid:
        out["invalid"] = invalid
    return out


def _invalid(cond: str, state: dict, drops_before: int, timer) -> str | None:
    """Why this run did not measure its condition (another process on this machine dropped
    the page cache or read the files), or None."""
    if common.drop_count() != drops_before:
        return "another process dropped the page cache during the run"
    if cond == "warm" and state["resident_bytes"] < state["file_bytes"]:
        return "the files were not fully resident when the clock started"
    if cond == "cold" and state["resident_bytes"]:
        return "part of the files was in the page cache when the clock started"
    if cond == "warm" and timer is not None and timer.pipeline_stats and timer.pipeline_stats[-1]["bytes_direct"]:
        return "the loader read from the disk in a warm run (page cache dropped meanwhile)"
    return None


def _disk_run(spec: dict) -> dict:
    files = [Path(f) for f in spec["files"]]
    state = _condition(spec["cond"], files, spec.get("settle_s", 2.5))
    r = limits.disk_best(files, "fio" if spec["task"] == "disk-fio" else "pread")
    return {**r, **state}


def _dram_run(spec: dict) -> dict:
    """DRAM tier vs memcpy, in one process: fill the pool once, then the items in the
    rotated order given by the spec (so no item always goes first). Items that write
    into pre-faulted memory run `inner` times (median kept: they take tens of ms);
    items into fresh memory run once, after the settle pause."""
    import statistics

    import torch

    from sllmd import _native
    torch.empty(16).clone()
    path = Path(spec["path"])
    loader_bench.prepare_ours()
    tier = loader_bench.DramTier(path)
    n = tier.nbytes
    arena = loader_bench.prefaulted_arena(n)
    settle = spec.get("settle_s", 2.5)
    if spec.get("drop", True):
        common.drop_caches()
        time.sleep(settle)
    results: dict[str, dict] = {"fill": {"seconds": tier.fill(), "bytes": n}}
    runs: dict[str, list] = {}
    try:
        for rnd in range(spec.get("inner", 3)):
            for item in spec["order"]:
                fresh = item in ("memcpy-fresh", "memcpy-fresh-4k", "ours-dram")
                if fresh and rnd:
                    continue
                if fresh:
                    time.sleep(settle)  # host-cold free memory, as for every fresh-memory run
                if item == "memcpy":  # into the arena's memory: the destination ours-dram-arena uses
                    dst = _native.HostBuffer(arena.native, n)
                    r = limits.memcpy_touched(n, tier.base_address, dst.address)
                    del dst
                elif item in ("memcpy-fresh", "memcpy-fresh-4k"):
                    r = limits.memcpy_fresh(n, tier.base_address, huge=item == "memcpy-fresh")
                    del r["_keep"]  # unmapped after the clock stopped
                else:
                    timer = loader_bench.DramStageTimer()
                    with timer.active():
                        t0 = time.perf_counter()
                        sd = tier.load(arena if item == "ours-dram-arena" else None)
                        seconds = time.perf_counter() - t0
                    r = {"seconds": seconds, "bytes": peers.unique_bytes(sd), "tensors": len(sd),
                         "stages": timer.summary()}
                    del sd
                runs.setdefault(item, []).append(r)
    finally:
        tier.release()
    for item, rs in runs.items():
        ranked = sorted(rs, key=lambda r: r["seconds"])
        if item == "memcpy":  # a limit must be an upper bound: its fastest run
            results[item] = {**ranked[0], "all_seconds": [round(r["seconds"], 5) for r in rs]}
            continue
        best = ranked[len(rs) // 2]  # the median run
        results[item] = {**best, "seconds": statistics.median(r["seconds"] for r in rs),
                         "all_seconds": [round(r["seconds"], 5) for r in rs]}
    return {"items": results}


def main() -> None:
    spec = json.loads(sys.argv[1])
    sys.path.insert(0, str(common.REPO))
    task = spec["task"]
    if task.startswith("disk-"):
        out = _disk_run(spec)
    elif task == "dram":
        out = _dram_run(spec)
    else:
        out = _loader_run(spec)
    out["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    common.emit_result(out)
    os._exit(0)  # skip interpreter teardown: the kernel frees the gigabytes just as well


if __name__ == "__main__":
    main()
