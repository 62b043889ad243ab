"""The loader's host side: the DRAM chunk pool, device buffers, and the
pipeline that moves checkpoint bytes between them (mechanics in csrc/).
It knows nothing of the checkpoint format: sllmd.store builds on it, and the
DRAM tier's unit (a checkpoint held in pool chunks) is sllmd.tiers.pooled."""
from .. import _native
from .buffers import HostArena
from .chunk_pool import ChunkPool
from .pipeline import LoadOptions

__all__ = ["ChunkPool", "HostArena", "LoadOptions", "counters"]

# (bytes counter, elapsed-time counter) behind each bandwidth in counters()
_BANDWIDTHS = {"read": ("bytes_read", "ns_read"), "read_direct": ("bytes_direct", "ns_read_direct"),
               "read_cached": ("bytes_cached", "ns_read_cached"), "load": ("bytes_read", "ns_load_wall"),
               "copy": ("bytes_copied", "ns_copy"), "h2d": ("bytes_h2d", "ns_h2d")}


def counters() -> dict:
    """Process-wide loader counters: bytes read with O_DIRECT (bytes_direct) and
    buffered from the page cache (bytes_cached), copied, verified; loads, failures,
    DRAM-tier hits (dram_hits, bytes_dram); host->device bytes and time on CUDA.
    Every ns_* is elapsed time with overlapping activity counted once (ns_load_wall
    is the union of the loads' intervals; ns_load_sum their plain sum), so
    `bandwidth_bytes_per_s` (bytes over elapsed time, per path) is a true rate."""
    c = _native.counters()
    c["bandwidth_bytes_per_s"] = {name: (c[nbytes] * 1e9 / c[ns] if c[ns] else None)
                                  for name, (nbytes, ns) in _BANDWIDTHS.items()}
    return c
