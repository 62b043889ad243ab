"""Faulting the DRAM pool's memory in, in the background, without slowing anyone down.

A fresh anonymous page costs a page fault on first touch (0.8-2 GB/s on this
kind of host, against ~9 GB/s for a copy into memory already touched), so the
pool is worth faulting in before the first load needs it. Doing it in one
`madvise(MADV_POPULATE_WRITE)` call over gigabytes holds the process's mmap lock
for seconds, which stalls every thread that maps memory (imports, thread stacks,
allocations): the daemon took 10-14 s to become ready and as long to stop. Here
the range is faulted in small slices with a pause between them, from a thread
that stops within one slice when asked, so start and close never wait for it.
MADV_POPULATE_WRITE leaves the contents alone, so chunks already in use are safe.
Where the kernel lacks it (< 5.14), pages simply fault in on first use.
"""
from __future__ import annotations

import ctypes
import logging
import threading
import time

log = logging.getLogger(__name__)

MADV_POPULATE_WRITE = 23
SLICE_BYTES = 4 << 20
PAUSE_S = 0.001  # between slices: lets threads waiting for the mmap lock through

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int


class BackgroundPrefault:
    """Faults [address, address + nbytes) in on a daemon thread; stop() ends it promptly."""

    def __init__(self, address: int, nbytes: int, name: str = "sllm-prefault",
                 slice_bytes: int = SLICE_BYTES, pause_s: float = PAUSE_S):
        self.address, self.nbytes = address, nbytes
        self.slice_bytes, self.pause_s = slice_bytes, pause_s
        self.done_bytes = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> "BackgroundPrefault":
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def stats(self) -> dict:
        return {"total_bytes": self.nbytes, "done_bytes": self.done_bytes, "running": self.running,
                "error": self.error}

    def _run(self) -> None:
        t0 = time.perf_counter()
        off = 0
        while off < self.nbytes and not self._stop.is_set():
            n = min(self.slice_bytes, self.nbytes - off)
            if _libc.madvise(self.address + off, n, MADV_POPULATE_WRITE) != 0:
                self.error = f"madvise(MADV_POPULATE_WRITE) failed: errno {ctypes.get_errno()}"
                log.info("not pre-faulting the DRAM pool (%s); its pages fault in on first use", self.error)
                return
            off += n
            self.done_bytes = off
            self._stop.wait(self.pause_s)
        if off >= self.nbytes:
            log.debug("pre-faulted %d MiB of the DRAM pool in %.1f s", self.nbytes >> 20, time.perf_counter() - t0)
