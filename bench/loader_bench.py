"""Our loader under the benchmark: sllmd.store.load_state_dict from SSD (cold
or warm page cache), and the DRAM tier (PooledCheckpoint -> CPU tensors).

For diagnosis, the stages of load_state_dict are timed by wrapping the
functions it calls (open_checkpoint, buffer allocation, the native pipeline,
view creation); the wrappers cost microseconds. The pipeline's own counters
(bytes read with O_DIRECT vs from the page cache, read/verify time summed
over threads) are kept too.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path


class StageTimer:
    """Wraps sllmd's reader stages with timers while active."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self.pipeline_stats: list[dict] = []

    def _wrap(self, module, name: str, label: str, keep_result=None):
        orig = getattr(module, name)

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                out = orig(*args, **kwargs)
            finally:
                self.times[label] = self.times.get(label, 0.0) + time.perf_counter() - t0
            if keep_result is not None:
                keep_result(out)
            return out

        setattr(module, name, wrapper)
        return module, name, orig

    @contextmanager
    def active(self):
        from sllmd.pool import buffers, pipeline
        from sllmd.store import reader
        saved = [
            self._wrap(reader, "open_checkpoint", "open_index"),
            self._wrap(buffers, "allocate", "allocate"),
            self._wrap(pipeline, "run", "pipeline", lambda s: self.pipeline_stats.append(dict(s))),
            self._wrap(reader, "tensor_views", "views"),
        ]
        try:
            yield self
        finally:
            for module, name, orig in saved:
                setattr(module, name, orig)

    def summary(self) -> dict:
        out = {k: round(v, 4) for k, v in self.times.items()}
        if self.pipeline_stats:
            s = self.pipeline_stats[-1]
            out.update({
                "bytes_direct": s["bytes_direct"], "bytes_cached": s["bytes_cached"],
                "read_thread_s": round(s["ns_read"] / 1e9, 4), "verify_thread_s": round(s["ns_verify"] / 1e9, 4),
                "native_wall_s": round(s["ns_wall"] / 1e9, 4), "used_direct": s["used_direct"],
            })
        return out


class DramStageTimer(StageTimer):
    """Splits PooledCheckpoint.load_state_dict into buffer allocation, chunk copies and views."""

    @contextmanager
    def active(self):
        from sllmd.pool import buffers
        from sllmd.tiers import pooled as cached
        saved = [
            self._wrap(buffers, "allocate", "allocate"),
            self._wrap(cached.PooledCheckpoint, "load_partitions", "allocate+copy"),
            self._wrap(cached, "tensor_views", "views"),
        ]
        try:
            yield self
        finally:
            for module, name, orig in saved:
                setattr(module, name, orig)


def prepare_ours():
    import sllmd.store  # noqa: F401
    import sllmd.pool  # noqa: F401


def prefaulted_arena(nbytes: int):
    """A HostArena whose pages are all faulted in (what a daemon does at start, off the clock)."""
    import torch

    from sllmd import _native
    from sllmd.pool import HostArena
    arena = HostArena(nbytes, prefault=False)
    buf = _native.HostBuffer(arena.native, arena.capacity)
    torch.frombuffer(buf, dtype=torch.uint8).fill_(0)
    del buf  # the range goes back to the arena, still faulted in
    return arena


def load_ours(path: Path, verify: bool, arena=None, timer: StageTimer | None = None) -> dict:
    from sllmd.store import load_state_dict
    if timer is None:
        return load_state_dict(path, device="cpu", verify=verify, arena=arena)
    with timer.active():
        return load_state_dict(path, device="cpu", verify=verify, arena=arena)


def checkpoint_bytes(path: Path) -> int:
    from sllmd.store import open_checkpoint
    return open_checkpoint(path).manifest.total_bytes


class DramTier:
    """A checkpoint held in a pre-faulted ChunkPool, loaded into CPU tensors on demand."""

    def __init__(self, path: Path):
        from sllmd.pool import ChunkPool  # noqa: F401
        from sllmd.tiers.pooled import PooledCheckpoint  # noqa: F401
        from sllmd.store import open_checkpoint
        self.ckpt = open_checkpoint(path)
        self.nbytes = self.ckpt.manifest.total_bytes
        chunk = 16 << 20
        self.pool = ChunkPool(capacity_bytes=-(-self.nbytes // chunk) * chunk, chunk_size=chunk)
        self.pool.prefault()
        self.pool.native.wait_prefault()
        self.cached = None

    def fill(self, verify: bool = True) -> float:
        """SSD -> DRAM tier (whatever the page cache holds); returns seconds."""
        from sllmd.tiers.pooled import PooledCheckpoint
        t0 = time.perf_counter()
        self.cached = PooledCheckpoint.read(self.ckpt, self.pool, verify=verify)
        return time.perf_counter() - t0

    @property
    def base_address(self) -> int:
        """Start of the pool's (contiguous, faulted-in, fully allocated) memory."""
        return self.pool.native.base_address

    def load(self, arena=None) -> dict:
        return self.cached.load_state_dict(device="cpu", arena=arena)

    def release(self) -> None:
        if self.cached is not None:
            self.cached.release()
            self.cached = None
