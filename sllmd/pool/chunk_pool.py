"""The DRAM chunk pool: fixed-size, aligned host chunks owned by the daemon.

Allocation and release are explicit and counted (stats() shows any leak).
The mechanics are native (csrc/chunk_pool.cpp); this is the typed face.
"""
from __future__ import annotations

import logging

from .. import _native
from ..errors import PoolExhaustedError

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 16 << 20


class ChunkPool:
    def __init__(self, capacity_bytes: int, chunk_size: int = DEFAULT_CHUNK_SIZE):
        self._native = _native.ChunkPool(chunk_size, capacity_bytes)
        self._pinned_for: str | None = None

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

    def pin(self) -> None:
        """Registers the pool with CUDA as pinned memory (once), for async copies."""
        if self._pinned_for is not None:
            return
        import torch
        rc = torch.cuda.cudart().cudaHostRegister(self._native.base_address, self._native.mapped_bytes, 0)
        if int(rc) != 0:
            raise RuntimeError(f"cudaHostRegister of the chunk pool failed: {rc}")
        self._pinned_for = "cuda"
        log.info("pinned %d MiB of chunk pool for CUDA", self._native.mapped_bytes >> 20)

    def unpin(self) -> None:
        """Undoes pin(); required before the pool's memory is unmapped."""
        if self._pinned_for is None:
            return
        import torch
        torch.cuda.cudart().cudaHostUnregister(self._native.base_address)
        self._pinned_for = None
