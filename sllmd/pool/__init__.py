"""The loader's host side: the DRAM chunk pool, device buffers, and the
pipeline that moves checkpoint bytes between them (mechanics in csrc/)."""
from .buffers import HostArena
from .chunk_pool import ChunkPool
from .pipeline import LoadOptions

__all__ = ["ChunkPool", "HostArena", "LoadOptions", "PooledCheckpoint", "counters"]


def counters() -> dict:
    """Process-wide loader counters (bytes read/copied/verified, loads, failures, time per stage)."""
    from .. import _native
    return _native.counters()


def __getattr__(name):  # PooledCheckpoint needs sllmd.store, which imports this package
    if name == "PooledCheckpoint":
        from .cached import PooledCheckpoint
        return PooledCheckpoint
    raise AttributeError(name)
