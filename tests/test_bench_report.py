"""bench/report.py's disk limit (issue 6 item 11): the best of every probe per repetition, and a run
in which a loader beats its limit is marked INVALID (the limit, not the loader, would be wrong)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import report  # noqa: E402  (bench/report.py)


def rec(rep, name, gbps, cond="cold", **extra):
    return {"rep": rep, "model": "synthetic", "cond": cond, "name": name,
            "result": {"bytes": int(gbps * 1e9), "seconds": 1.0, **extra}}


def test_the_disk_limit_is_the_best_probe_and_a_loader_above_it_invalidates_the_run():
    records = [rec(0, "disk-fio", 1.0), rec(0, "disk-pread", 2.0), rec(0, "ours", 1.5),
               rec(1, "disk-fio", 1.2), rec(1, "disk-pread", 0.9), rec(1, "ours", 1.5),
               rec(1, "safetensors", 0.5, materialized_tensors=3, load_s=0.01),   # its lazy line: not a loader
               {"rep": 0, "model": "synthetic", "cond": "dram", "name": "dram", "result": {"items": {
                   "memcpy": {"bytes": 10 * 10**9, "seconds": 1.0},
                   "ours-dram-arena": {"bytes": 12 * 10**9, "seconds": 1.0}}}}]
    summary = report.summarize(records)
    assert report.per_rep_rates(records)[("synthetic", "cold", "disk-limit")] == {0: 2.0, 1: 1.2}
    assert summary["limit_violations"] == [
        "synthetic cold ours rep 1: 1.50 GB/s > disk-limit 1.20 GB/s",
        "synthetic dram ours-dram-arena rep 0: 12.00 GB/s > memcpy 10.00 GB/s"]
    assert report.markdown(summary).startswith("**INVALID RUN")

    valid = report.summarize(records[:3])
    assert valid["limit_violations"] == [] and "INVALID" not in report.markdown(valid)
