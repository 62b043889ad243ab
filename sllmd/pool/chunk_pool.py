"""The DRAM chunk pool: fixed-size, aligned host chunks owned by the daemon.

Allocation and release are explicit and counted (stats() shows any leak).
The mechanics are native (csrc/chunk_pool.cpp); this is the typed face.
"""
from __future__ import annotations

import logging
import threading

from .. import _native
from ..errors import PoolExhaustedError

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 16 << 20
CUDA_HOST_REGISTER_PORTABLE = 1  # pinned for every CUDA context, not only the current device's


class ChunkPool:
    def __init__(self, capacity_bytes: int, chunk_size: int = DEFAULT_CHUNK_SIZE):
        self._native = _native.ChunkPool(chunk_size, capacity_bytes)
        self._pin_lock = threading.Lock()
        self._pinned = False
        self._pin_error: str | None = None
        self._pin_thread: threading.Thread | None = None
        self._closed = False

    @property
    def native(self) -> "_native.ChunkPool":
        return self._native

    @property
    def chunk_size(self) -> int:
        return self._native.chunk_size

    @property
    def capacity_bytes(self) -> int:
        return self._native.capacity_chunks * self._native.chunk_size

    def chunks_for(self, nbytes: int) -> int:
        return -(-nbytes // self.chunk_size)

    def allocate(self, n: int) -> list[int]:
        """n chunks, all or nothing."""
        if n == 0:
            return []
        ids = self._native.allocate(n)
        if not ids:
            s = self._native.stats()
            raise PoolExhaustedError(f"the DRAM chunk pool has {s['free_chunks']} free chunks of "
                                     f"{s['chunk_size'] >> 20} MiB, {n} needed")
        return ids

    def release(self, ids: list[int]) -> None:
        if ids:
            self._native.release(ids)

    def address(self, chunk: int) -> int:
        return self._native.address(chunk)

    def stats(self) -> dict:
        s = self._native.stats()
        s["capacity_bytes"] = s["capacity_chunks"] * s["chunk_size"]
        s["used_bytes"] = s["used_chunks"] * s["chunk_size"]
        return s

    def prefault(self, threads: int = 1) -> None:
        """Faults the pool's pages in, in the background (safe while chunks are in use)."""
        self._native.start_prefault(threads)

    @property
    def pinned(self) -> bool:
        return self._pinned

    def pin(self) -> bool:
        """Registers the whole pool with CUDA as pinned, portable memory, once (later
        calls wait for the first); asynchronous copies need it. False when CUDA refused
        (logged once; copies then still work, staged by the driver) or the pool is closed."""
        with self._pin_lock:
            if self._pinned or self._pin_error is not None or self._closed:
                return self._pinned
            import torch
            if not self._native.mapped_bytes or not torch.cuda.is_available():
                return False
            rc = torch.cuda.cudart().cudaHostRegister(self._native.base_address, self._native.mapped_bytes,
                                                      CUDA_HOST_REGISTER_PORTABLE)
            if int(rc) != 0:
                self._pin_error = str(rc)
                log.warning("cudaHostRegister of the %d MiB chunk pool failed (%s): host->device copies "
                            "will not overlap", self._native.mapped_bytes >> 20, rc)
                return False
            self._pinned = True
        log.info("pinned %d MiB of chunk pool for CUDA", self._native.mapped_bytes >> 20)
        return True

    def pin_in_background(self) -> threading.Thread:
        """Starts pin() on a thread (pinning a large pool takes seconds); loads that
        need the pool pinned wait for it in pin()."""
        with self._pin_lock:
            if self._pin_thread is None:
                self._pin_thread = threading.Thread(target=self._pin_quietly, name="sllm-pin", daemon=True)
                self._pin_thread.start()
            return self._pin_thread

    def _pin_quietly(self) -> None:
        try:
            self.pin()
        except Exception:  # e.g. no usable CUDA runtime: loads then copy unpinned
            log.exception("pinning the chunk pool failed")

    def unpin(self) -> None:
        """Undoes pin(); required before the pool's memory is unmapped."""
        with self._pin_lock:
            if not self._pinned:
                return
            import torch
            rc = torch.cuda.cudart().cudaHostUnregister(self._native.base_address)
            if int(rc) != 0:
                log.warning("cudaHostUnregister of the chunk pool failed: %s", rc)
            self._pinned = False

    def close(self) -> None:
        """Stops background work and unpins (idempotent). Call it once nothing uses
        the pool; its memory is unmapped when the last reference goes."""
        thread = self._pin_thread
        if thread is not None:
            thread.join()
        with self._pin_lock:
            self._closed = True
        self.unpin()
        self._native.stop_prefault()

    def __del__(self):
        try:
            if self._pinned:
                self.unpin()  # never unmap memory that CUDA still has registered
        except Exception:
            pass
