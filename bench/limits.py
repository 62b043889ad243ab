"""The limits a loader is measured against, on the same bytes:

- disk: a parallel O_DIRECT sequential read of the checkpoint's data files,
  measured the best ways this machine allows, the best taken: our own reader
  (os.preadv on 4, 8 and 16 threads, 16 MiB requests as our loader makes and
  4 MiB ones, into reused buffers that really are transparent huge pages) and
  fio (libaio, several queue depths and job counts, 16 MiB requests) where it
  is installed. None touches the page cache. It is an upper bound only if no
  loader beats it: report.py marks a run where one did invalid.
- memory: memcpy bandwidth (sllmd._native.parallel_copy on 2 threads) into
  memory that is already faulted in, and into fresh memory (the mapping and
  its page faults inside the timed region).
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

IO_SIZE = 16 << 20  # our loader's request size (LoadOptions.io_size and the pool's chunk size)
PREAD_PROBES = ((8, IO_SIZE), (16, IO_SIZE), (4, IO_SIZE), (8, 4 << 20))  # (threads, request size)
FIO_PROBES = ((16, 1), (32, 4), (8, 8))  # (iodepth, jobs per file)


def fio_available() -> bool:
    return shutil.which("fio") is not None


def disk_fio(paths: list[Path], io_size: int = IO_SIZE, iodepth: int = 16, jobs: int = 1) -> dict:
    """Sequential O_DIRECT read of every file by fio, all files at once, each split into
    `jobs` consecutive slices read by one job each (libaio at `iodepth`). Returns the bytes
    read and the group's runtime (fio's own clock)."""
    cmd = ["fio", "--output-format=json", "--group_reporting"]
    for p in paths:
        size = os.path.getsize(p)
        n = max(1, min(jobs, size // io_size))
        part = size // n // io_size * io_size or size
        cmd += [f"--name=read-{Path(p).name}", f"--filename={p}", "--readonly", "--direct=1", "--rw=read",
                f"--bs={io_size}", "--ioengine=libaio", f"--iodepth={iodepth}", f"--numjobs={n}",
                f"--size={part}", f"--offset_increment={part}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]["read"]
    return {"seconds": float(job["runtime"]) / 1e3, "bytes": int(job["io_bytes"]),
            "tool": f"fio libaio bs={io_size >> 20}M iodepth={iodepth} jobs/file={jobs}"}


class _HugeBuffers:
    """`count` buffers of `size` bytes carved from one ChunkPool mapping: 2 MiB aligned,
    MADV_HUGEPAGE, faulted in. thp_bytes says how much of it the kernel really backed
    with huge pages (AnonHugePages in smaps): with 4 KiB pages a virtio request holds
    at most max_segments pages (~1 MiB), with huge pages max_sectors_kb (4 MiB)."""

    def __init__(self, count: int, size: int):
        from sllmd import _native
        self.pool = _native.ChunkPool(size, count * size)
        self.pool.start_prefault(2)
        self.pool.wait_prefault()
        self.ids = self.pool.allocate(count)
        self.views = [memoryview((ctypes.c_char * size).from_address(self.pool.address(i))).cast("B")
                      for i in self.ids]
        self.thp_bytes = _anon_huge_bytes(self.pool.base_address, count * size)


def _anon_huge_bytes(base: int, length: int) -> int | None:
    try:
        with open("/proc/self/smaps") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    total, inside = 0, False
    for line in lines:
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo < base + length and hi > base
        elif inside and head == "AnonHugePages:":
            total += int(line.split()[1]) * 1024
    return total


def disk_pread(paths: list[Path], threads: int = 8, io_size: int = IO_SIZE) -> dict:
    """Sequential O_DIRECT read with os.preadv on `threads` threads; requests are handed out in
    file order (a shared cursor), each thread reading into its own reused huge-page buffer."""
    work = []
    for p in paths:
        size = os.path.getsize(p)
        work += [(str(p), off, min(io_size, size - off)) for off in range(0, size, io_size)]
    fds = {str(p): os.open(p, os.O_RDONLY | os.O_DIRECT) for p in paths}
    bufs = _HugeBuffers(threads, io_size)
    cursor = iter(range(len(work)))
    lock = threading.Lock()
    done = [0] * threads
    errors: list[BaseException] = []

    def reader(k: int) -> None:
        view = bufs.views[k]
        start.wait()
        try:
            while True:
                with lock:
                    i = next(cursor, None)
                if i is None:
                    return
                path, off, n = work[i]
                got = 0
                while got < n:
                    r = os.preadv(fds[path], [view[got:n]], off + got)
                    if r <= 0:
                        raise OSError(f"{path}: short O_DIRECT read at {off + got}")
                    got += r
                done[k] += got
        except BaseException as e:  # reported after the join
            errors.append(e)

    start = threading.Barrier(threads + 1)
    pool = [threading.Thread(target=reader, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in pool:
        t.join()
    seconds = time.perf_counter() - t0
    for fd in fds.values():
        os.close(fd)
    if errors:
        raise errors[0]
    thp = bufs.thp_bytes
    pages = f"huge pages {thp >> 20}/{threads * io_size >> 20} MiB" if thp is not None else "huge pages requested"
    return {"seconds": seconds, "bytes": sum(done),
            "tool": f"preadv O_DIRECT {threads} threads x {io_size >> 20} MiB, {pages}"}


def disk_best(paths: list[Path], tool: str) -> dict:
    """Every probe of `tool` ("pread" or "fio") over the same files (O_DIRECT: no probe warms
    the next one's page cache); the fastest, with all of them under "probes"."""
    if tool == "fio":
        probes = [disk_fio(paths, IO_SIZE, depth, jobs) for depth, jobs in FIO_PROBES]
    else:
        probes = [disk_pread(paths, threads, size) for threads, size in PREAD_PROBES]
    best = max(probes, key=lambda r: r["bytes"] / r["seconds"])
    return {**best, "probes": [{"tool": r["tool"], "gbps": round(r["bytes"] / r["seconds"] / 1e9, 3)}
                               for r in probes]}


def memcpy_touched(nbytes: int, src_address: int, dst_address: int, threads: int = 2) -> dict:
    """memcpy of nbytes from src into a destination that is already faulted in."""
    from sllmd import _native
    t0 = time.perf_counter()
    _native.parallel_copy(dst_address, src_address, nbytes, threads)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "bytes": nbytes, "tool": f"parallel_copy {threads} threads, pre-faulted dst"}


def memcpy_fresh(nbytes: int, src_address: int, threads: int = 2, huge: bool = True) -> dict:
    """memcpy into a fresh mapping; the mapping and its page faults are timed. huge=True: sllmd's
    HostBuffer (2 MiB aligned, MADV_HUGEPAGE); huge=False: a plain anonymous mmap (4 KiB pages)."""
    import mmap

    from sllmd import _native
    t0 = time.perf_counter()
    if huge:  # a ChunkPool mapping: MADV_HUGEPAGE (HostBuffer's own mappings use 4 KiB pages)
        dst = _native.ChunkPool(nbytes, nbytes)
        addr = dst.base_address
    else:
        dst = mmap.mmap(-1, nbytes)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(dst))
    _native.parallel_copy(addr, src_address, nbytes, threads)
    seconds = time.perf_counter() - t0
    pages = "huge pages requested" if huge else "4 KiB pages"
    return {"seconds": seconds, "bytes": nbytes, "tool": f"parallel_copy {threads} threads, fresh dst ({pages})",
            "_keep": dst}


if __name__ == "__main__":  # python bench/limits.py FILE...: every disk probe on these files, then the best
    import sys
    files = [Path(a) for a in sys.argv[1:]]
    if not files:
        raise SystemExit("usage: python bench/limits.py FILE...")
    for tool in ("pread", "fio") if fio_available() else ("pread",):
        r = disk_best(files, tool)
        for probe in r["probes"]:
            print(f"{probe['gbps']:6.2f} GB/s  {probe['tool']}")
        print(f"{r['bytes'] / r['seconds'] / 1e9:6.2f} GB/s  best of {tool}")
