"""Shared helpers for the benchmark: page-cache control, residency checks,
file-mapping detection (to force materialization of mmap-backed tensors),
statistics and a tiny subprocess protocol between run_all.py and worker.py."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
import ctypes
import json
import mmap
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
DEFAULT_WORKDIR = REPO / ".cache" / "bench"
RESULTS_DIR = BENCH_DIR / "results"
RESULT_MARK = "BENCH_RESULT "
GB = 1e9  # throughput is reported in decimal GB/s
PAGE = 4096

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_libc.mincore.restype = ctypes.c_int
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mmap.restype = ctypes.c_void_p
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


# --- page cache ------------------------------------------------------------------
def can_drop_caches() -> tuple[bool, str]:
    """Whether this process may drop the page cache (root + writable /proc/sys/vm/drop_caches)."""
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1")
        return True, "ok"
    except OSError as e:
        return False, f"cannot write /proc/sys/vm/drop_caches ({e.strerror}); cold runs are skipped"


def drop_caches() -> None:
    """sync; echo 3 > /proc/sys/vm/drop_caches (raises OSError where not permitted)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def drop_count() -> int:
    """How many times anyone dropped the page cache since boot (/proc/vmstat drop_pagecache)."""
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                if line.startswith("drop_pagecache "):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


@contextlib.contextmanager
def exclusive_bench(name: str, wait_note=None):
    """Holds an exclusive lock (/tmp/sllm-bench.lock) while a benchmark runs, so two benchmark
    scripts on this machine do not drop each other's page cache or share the disk and cores."""
    import fcntl
    f = open("/tmp/sllm-bench.lock", "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if wait_note:
                wait_note(f"waiting for another benchmark to finish (/tmp/sllm-bench.lock, {name})")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield
    finally:
        f.close()


def resident_bytes(path: str | os.PathLike) -> tuple[int, int]:
    """(bytes of `path` in the page cache, file size), from mincore() on a mapping."""
    size = os.path.getsize(path)
    if size == 0:
        return 0, 0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap failed on {path}")
        try:
            pages = (size + PAGE - 1) // PAGE
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore failed on {path}")
            count = sum(v & 1 for v in bytes(vec))
        finally:
            _libc.munmap(ctypes.c_void_p(addr), size)
    finally:
        os.close(fd)
    return min(count * PAGE, size), size


def make_resident(paths: Iterable[str | os.PathLike], chunk: int = 16 << 20, refresh: bool = False) -> int:
    """Reads files through the page cache until they are fully resident; returns bytes read.
    refresh=True reads resident files too, which marks their pages accessed: this VM runs a
    DAMON pageout scheme (pages idle for ~60 s are reclaimed), so "resident a minute ago"
    does not mean "resident when the clock starts"."""
    total = 0
    for p in paths:
        if not refresh:
            have, size = resident_bytes(p)
            if have >= size:
                continue
        fd = os.open(p, os.O_RDONLY)
        try:
            buf = bytearray(chunk)
            view = memoryview(buf)
            while n := os.readv(fd, [view]):
                total += n
        finally:
            os.close(fd)
    return total


# --- mmap-backed tensors -------------------------------------------------------------
def file_mappings(paths: Iterable[str | os.PathLike]) -> list[tuple[int, int]]:
    """Address ranges in this process that map any of `paths` (from /proc/self/maps)."""
    wanted = {os.path.realpath(p) for p in paths}
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and os.path.realpath(parts[5].strip()) in wanted:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                ranges.append((lo, hi))
    return ranges


def in_ranges(addr: int, ranges: list[tuple[int, int]]) -> bool:
    return any(lo <= addr < hi for lo, hi in ranges)


# --- statistics ------------------------------------------------------------------------
def median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def gbps(nbytes: int, seconds: float | None) -> float | None:
    return nbytes / seconds / GB if seconds else None


# --- subprocess protocol ------------------------------------------------------------------
def emit_result(result: dict) -> None:
    """The worker's last stdout line: one JSON object."""
    sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()


def run_worker(spec: dict, timeout: float = 600) -> dict:
    """Runs bench/worker.py in a fresh interpreter; returns its result (or an error record)."""
    env = dict(os.environ, RUNAI_STREAMER_LOG_LEVEL="WARNING", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(BENCH_DIR / "worker.py"), json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "spec": spec}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(RESULT_MARK)]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-8:]
        return {"error": f"worker exited {p.returncode}: " + " | ".join(tail), "spec": spec}
    out = json.loads(lines[-1][len(RESULT_MARK):])
    out["process_wall_s"] = time.perf_counter() - t0
    return out


def machine_info() -> dict:
    """A short description of the host for the report."""
    info = {"cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["mem_gib"] = round(int(f.readline().split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    info["kernel"] = os.uname().release
    try:
        info["thp"] = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        pass
    try:
        src = subprocess.run(["findmnt", "-no", "SOURCE,FSTYPE", "--target", str(REPO)], capture_output=True,
                             text=True).stdout.strip()
        info["filesystem"] = src
    except OSError:
        pass
    return info


@dataclass(frozen=True)
class CheckpointFiles:
    """One benchmark model's files: ours (a checkpoint directory) and the peers' formats."""

    root: Path

    @property
    def sllm(self) -> Path:
        return self.root / "sllm"

    @property
    def safetensors(self) -> Path:
        return self.root / "model.safetensors"

    def sllm_data_files(self) -> list[Path]:
        return sorted(self.sllm.glob("data-*.bin"))
