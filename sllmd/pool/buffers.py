"""One device buffer per partition: the allocation every tensor is a view into.

On a CPU host the "device" is host memory: from a pre-faulted HostArena when
the daemon has one (copies then run at memcpy speed), else a fresh mapping
(4 KiB pages: fresh huge pages fault in slowly in a VM). On CUDA it is one
torch allocation.
"""
from __future__ import annotations

import torch

from .. import _native
from ..errors import OutOfMemoryError


ARENA_GRANULE = 2 << 20  # the arena hands out ranges in multiples of this (csrc/host_memory.h kHugePage)


class HostArena:
    """Pre-faulted host memory for CPU-device buffers (the device tier's budget on a CPU host)."""

    def __init__(self, capacity_bytes: int, prefault: bool = True, threads: int = 1):
        self.native = _native.HostArena(capacity_bytes)
        if prefault:
            self.native.start_prefault(threads)

    @property
    def capacity(self) -> int:
        return self.native.capacity

    @property
    def used(self) -> int:
        return self.native.used


def allocate(nbytes: int, device: torch.device, arena: HostArena | None = None) -> torch.Tensor:
    """A uint8 tensor of nbytes on `device`, 4096-byte aligned."""
    if device.type == "cpu":
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        try:
            host = _native.HostBuffer(arena.native, nbytes) if arena is not None else _native.HostBuffer(nbytes)
        except (MemoryError, ValueError) as e:
            where = "the host arena" if arena is not None else "host memory"
            raise OutOfMemoryError(f"cannot allocate {nbytes} bytes in {where}: {e}") from e
        return torch.frombuffer(host, dtype=torch.uint8)
    try:
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    except torch.OutOfMemoryError as e:
        raise OutOfMemoryError(f"cannot allocate {nbytes} bytes on {device}: {e}") from e


def address(buffer: torch.Tensor) -> int:
    return buffer.data_ptr()
