"""The DRAM tier: whole checkpoints cached in the daemon's chunk pool.

An entry is a PooledCheckpoint (the checkpoint's partition files in pool
chunks). Entries are refcounted while a load copies from them; an entry with
references is never evicted. To admit a checkpoint the tier evicts least
recently used idle entries (reason `lru`) until its chunks fit; one that could
never fit (larger than the pool, or everything else in use) is not cached and
the caller loads from SSD directly.

Callbacks (on_evict) run under the tier's lock: they must take only leaf locks.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import PoolExhaustedError
from ..pool import ChunkPool, LoadOptions
from .pooled import PooledCheckpoint
from ..store.format import Checkpoint
from . import policy
from sllmd.errors import ModelInUseError
from .states import EvictReason

log = logging.getLogger(__name__)


@dataclass
class DramEntry:
    name: str
    cached: PooledCheckpoint
    nbytes: int  # pool bytes it occupies (whole chunks)
    last_used: float
    refs: int = 0

    def to_dict(self) -> dict:
        return {"name": self.name, "size_bytes": self.nbytes, "checkpoint_bytes": self.cached.nbytes,
                "last_used": self.last_used, "refs": self.refs}


class DramTier:
    def __init__(self, pool: ChunkPool, on_evict: Callable[[str, EvictReason], None] | None = None,
                 clock: Callable[[], float] = time.time):
        self.pool = pool
        self.on_evict = on_evict
        self.clock = clock
        self._lock = threading.RLock()
        self._entries: dict[str, DramEntry] = {}
        self._admitting: set[str] = set()

    @property
    def capacity_bytes(self) -> int:
        return self.pool.capacity_bytes

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._entries

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def entries(self) -> list[DramEntry]:
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: e.name)

    def bytes_of(self, name: str) -> int | None:
        """Pool bytes the cached copy of `name` occupies; None when it is not cached."""
        with self._lock:
            e = self._entries.get(name)
            return e.nbytes if e is not None else None

    def pool_bytes_for(self, ckpt: Checkpoint) -> int:
        chunks = policy.chunks_needed((p.nbytes for p in ckpt.manifest.partitions), self.pool.chunk_size)
        return chunks * self.pool.chunk_size

    # --- use --------------------------------------------------------------------
    def acquire(self, name: str) -> PooledCheckpoint | None:
        """The cached checkpoint with a reference taken (release() it), or None when not cached."""
        with self._lock:
            e = self._entries.get(name)
            if e is None:
                return None
            e.refs += 1
            e.last_used = self.clock()
            return e.cached

    def release(self, name: str) -> None:
        with self._lock:
            e = self._entries.get(name)
            if e is not None and e.refs > 0:
                e.refs -= 1

    def admit(self, name: str, ckpt: Checkpoint, *, verify: bool = True,
              device_buffers: list[torch.Tensor] | None = None,
              options: LoadOptions | None = None) -> PooledCheckpoint | None:
        """Reads `ckpt` into the pool (optionally filling host `device_buffers` in the
        same pass) and caches it, referenced once for the caller. None when it cannot
        fit; then nothing was read and nothing was evicted. Room is made and the chunks
        taken in one step under the lock, so an admission never evicts others and then
        finds the room gone."""
        sizes = [self.pool.chunks_for(p.nbytes) for p in ckpt.manifest.partitions]
        need = sum(sizes) * self.pool.chunk_size
        with self._lock:
            if name in self._entries or name in self._admitting:
                return None  # someone else cached it meanwhile; this caller reads its own way
            if need > self.capacity_bytes:
                log.info("%s (%d bytes) is larger than the DRAM tier (%d); not cached", name, need,
                         self.capacity_bytes)
                return None
            victims = self._victims(need)
            if victims is None:
                return None
            for v in victims:
                self._drop(v, EvictReason.LRU)
            try:
                chunks = self._allocate(sizes)
            except PoolExhaustedError:  # the pool's other users hold the room: nothing more to evict
                log.info("the chunk pool has no room for %s; not cached", name)
                return None
            self._admitting.add(name)
        try:
            cached = PooledCheckpoint.read(ckpt, self.pool, verify=verify, options=options,
                                           device_buffers=device_buffers, chunks=chunks)
        finally:
            with self._lock:
                self._admitting.discard(name)
        with self._lock:
            self._entries[name] = DramEntry(name, cached, need, self.clock(), refs=1)
        log.info("cached %s in the DRAM tier (%d bytes)", name, need)
        return cached

    def _allocate(self, sizes: list[int]) -> list[list[int]]:
        """Chunks for each partition, all or nothing."""
        got: list[list[int]] = []
        try:
            for n in sizes:
                got.append(self.pool.allocate(n))
        except BaseException:
            for c in got:
                self.pool.release(c)
            raise
        return got

    def _victims(self, need: int) -> list[str] | None:
        free = self.pool.stats()["free_chunks"] * self.pool.chunk_size
        cands = [policy.Candidate(e.name, e.nbytes, e.last_used, busy=e.refs > 0) for e in self._entries.values()]
        return policy.choose_victims(cands, need, free)

    # --- eviction -----------------------------------------------------------------
    def evict(self, name: str, reason: EvictReason = EvictReason.MANUAL) -> bool:
        """Drops the cached copy; False when it was not cached; ModelInUseError while referenced."""
        with self._lock:
            e = self._entries.get(name)
            if e is None:
                return False
            if e.refs > 0:
                raise ModelInUseError(f"model {name!r} is being loaded from the DRAM tier")
            self._drop(name, reason)
            return True

    def _drop(self, name: str, reason: EvictReason) -> None:
        e = self._entries.pop(name)
        e.cached.release()
        log.info("evicted %s from the DRAM tier (%s, %d bytes)", name, reason.value, e.nbytes)
        if self.on_evict is not None:
            self.on_evict(name, reason)

    def clear(self) -> None:
        """Releases every entry (shutdown); references no longer matter."""
        with self._lock:
            for e in self._entries.values():
                e.cached.release()
            self._entries.clear()

    def stats(self) -> dict:
        with self._lock:
            return {"used_bytes": self.used_bytes, "capacity_bytes": self.capacity_bytes,
                    "models": len(self._entries), "pool": self.pool.stats()}
