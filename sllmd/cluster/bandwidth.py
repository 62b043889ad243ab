"""Bandwidths per load path, measured online (DESIGN.md section 8).

An exponentially weighted moving average of bytes/s per path, fed by the node's real loads
(Node calls observe where a load finishes: "dram_device" for a DRAM hit, "ssd_device" for a
pipelined SSD -> DRAM -> device load) and seeded at start by `probe`. Paths: ssd_dram,
dram_device, ssd_device, peer_ssd, repo_ssd. Thread-safe.
"""
from __future__ import annotations

import threading

PATHS = ("ssd_dram", "dram_device", "ssd_device", "peer_ssd", "repo_ssd")
ALPHA = 0.3            # weight of the newest observation
MIN_BYTES = 64 << 10   # a smaller transfer measures latency, not bandwidth


class Ewma:
    """A thread-safe exponentially weighted moving average per key."""

    def __init__(self, alpha: float = ALPHA):
        if not 0.0 < alpha <= 1.0:
            raise ValueError("alpha must be in (0, 1]")
        self.alpha = alpha
        self._values: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, key: str, value: float) -> float:
        with self._lock:
            old = self._values.get(key)
            new = value if old is None else old + self.alpha * (value - old)
            self._values[key] = new
            self._counts[key] = self._counts.get(key, 0) + 1
            return new

    def get(self, key: str) -> float | None:
        with self._lock:
            return self._values.get(key)

    def count(self, key: str) -> int:
        with self._lock:
            return self._counts.get(key, 0)

    def to_dict(self) -> dict[str, float]:
        with self._lock:
            return dict(self._values)


class Bandwidths:
    def __init__(self, alpha: float = ALPHA):
        self._ewma = Ewma(alpha)

    def observe(self, path: str, nbytes: int, seconds: float) -> None:
        """One transfer of nbytes over `path` that took `seconds`; too small or zero-time ones are ignored."""
        if path not in PATHS:
            raise ValueError(f"unknown bandwidth path {path!r} (one of {', '.join(PATHS)})")
        if nbytes < MIN_BYTES or not seconds or seconds <= 0:
            return
        self._ewma.add(path, nbytes / seconds)

    def get(self, path: str) -> float | None:
        return self._ewma.get(path)

    def samples(self, path: str) -> int:
        return self._ewma.count(path)

    def to_dict(self) -> dict[str, float]:
        return self._ewma.to_dict()


def probe(node, nbytes: int = 64 << 20) -> dict:
    """A short start-up probe seeding node.bandwidths: dram_device from the loader's counters
    of earlier copies, else a copy of `nbytes` between two host buffers (the CPU device's path).
    Returns what it measured (bytes/s per path)."""
    import time

    import torch

    from sllmd import pool as pool_mod
    bws: Bandwidths = node.bandwidths
    out: dict[str, float] = {}
    counters = pool_mod.counters().get("bandwidth_bytes_per_s") or {}
    for path, key in (("ssd_dram", "read"), ("dram_device", "h2d")):
        if counters.get(key):
            bws.observe(path, MIN_BYTES, MIN_BYTES / counters[key])
            out[path] = counters[key]
    if "dram_device" not in out and str(node.config.device).startswith("cpu"):
        src = torch.empty(nbytes, dtype=torch.uint8)
        dst = torch.empty(nbytes, dtype=torch.uint8)
        dst.copy_(src)   # fault both in first
        samples = []
        for _ in range(3):   # the median: one copy on a shared 2-core host can lose its slice
            t0 = time.perf_counter()
            dst.copy_(src)
            samples.append(time.perf_counter() - t0)
        seconds = sorted(samples)[1]
        bws.observe("dram_device", nbytes, seconds)
        out["dram_device"] = nbytes / seconds
    return out
