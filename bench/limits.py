"""The limits a loader is measured against, on the same bytes:

- disk: a parallel O_DIRECT sequential read of the checkpoint's data files,
  by fio (libaio, 16 MiB requests, queue depth 16; its buffers have 4 KiB
  pages) when fio is installed, and by our own reader (os.preadv of 16 MiB
  requests on 4 threads into reused buffers backed by huge pages, and with
  4 KiB pages for comparison). None touches the page cache.
- memory: memcpy bandwidth (sllmd._native.parallel_copy on 2 threads) into
  memory that is already faulted in, and into fresh memory (the mapping and
  its page faults inside the timed region).
"""
from __future__ import annotations

import json
import mmap
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

IO_SIZE = 16 << 20


def fio_available() -> bool:
    return shutil.which("fio") is not None


def disk_fio(paths: list[Path], io_size: int = IO_SIZE, iodepth: int = 16) -> dict:
    """Sequential O_DIRECT read of every file by fio (one job per file, run one after the other).
    Returns seconds and bytes summed over the files; the time is fio's own runtime."""
    total_bytes, total_s = 0, 0.0
    for p in paths:
        size = os.path.getsize(p)
        cmd = ["fio", "--name=seqread", f"--filename={p}", "--readonly", "--direct=1", "--rw=read",
               f"--bs={io_size}", "--ioengine=libaio", f"--iodepth={iodepth}", f"--size={size}",
               "--numjobs=1", "--output-format=json"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        job = json.loads(out[out.index("{"):])["jobs"][0]["read"]
        total_bytes += int(job["io_bytes"])
        total_s += float(job["runtime"]) / 1e3  # ms
    return {"seconds": total_s, "bytes": total_bytes, "tool": f"fio libaio bs={io_size >> 20}M iodepth={iodepth}"}


def _aligned_buffer(nbytes: int, huge: bool):
    """A faulted-in, page-aligned buffer; with huge=True 2 MiB aligned with transparent huge
    pages requested (sllmd's HostBuffer), else plain 4 KiB pages (an anonymous mmap)."""
    if huge:
        from sllmd import _native
        return _native.HostBuffer(nbytes, prefault=True)
    buf = mmap.mmap(-1, nbytes)
    view = memoryview(buf)
    view[::4096] = bytes(len(view[::4096]))
    view.release()
    return buf


def disk_pread(paths: list[Path], threads: int = 4, io_size: int = IO_SIZE, huge: bool = True) -> dict:
    """Sequential O_DIRECT read with os.preadv on `threads` threads; requests are handed out in
    file order (a shared cursor), each thread reading into its own reused, faulted-in buffer.

    The buffer's page size matters on virtio-blk: a request holds at most max_segments
    (254 here) physically contiguous segments, so 4 KiB pages cap a request near 1 MiB while
    huge pages allow max_sectors_kb (4 MiB); the same disk reads about twice as fast."""
    work = []
    for p in paths:
        size = os.path.getsize(p)
        work += [(str(p), off, min(io_size, size - off)) for off in range(0, size, io_size)]
    fds = {str(p): os.open(p, os.O_RDONLY | os.O_DIRECT) for p in paths}
    cursor = iter(range(len(work)))
    lock = threading.Lock()
    done = [0] * threads
    errors: list[BaseException] = []

    def reader(k: int) -> None:
        buf = _aligned_buffer(io_size, huge)
        view = memoryview(buf)
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
        finally:
            view.release()

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
    pages = "huge pages" if huge else "4 KiB pages"
    return {"seconds": seconds, "bytes": sum(done),
            "tool": f"preadv O_DIRECT {threads} threads x {io_size >> 20} MiB, {pages}"}


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
    import ctypes

    from sllmd import _native
    t0 = time.perf_counter()
    if huge:
        dst = _native.HostBuffer(nbytes, prefault=False)
        addr = dst.address
    else:
        dst = mmap.mmap(-1, nbytes)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(dst))
    _native.parallel_copy(addr, src_address, nbytes, threads)
    seconds = time.perf_counter() - t0
    pages = "huge pages requested" if huge else "4 KiB pages"
    return {"seconds": seconds, "bytes": nbytes, "tool": f"parallel_copy {threads} threads, fresh dst ({pages})",
            "_keep": dst}
