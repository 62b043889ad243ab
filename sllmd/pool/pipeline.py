"""Running native load tasks: options, error mapping, and the CUDA copy stage.

A LoadTask reads partition files with reader threads (O_DIRECT where the page
cache does not hold the data), verifies block checksums and, when asked,
copies into destination buffers on copy threads. For CUDA destinations the
last stage is ours: each finished chunk goes to the device with an
asynchronous copy on one of several streams.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from .. import _native
from ..errors import (CorruptCheckpointError, LoadCancelledError, LoadError, SllmError,
                      TruncatedCheckpointError)

log = logging.getLogger(__name__)

_ERRORS: dict[str, type[SllmError]] = {
    "checksum": CorruptCheckpointError,
    "truncated": TruncatedCheckpointError,
    "missing": CorruptCheckpointError,
    "io": LoadError,
    "cancelled": LoadCancelledError,
}


@dataclass
class LoadOptions:
    readers: int = 8  # 16 MiB requests; with the CRC inline, 4 readers left the disk idle at times
    copiers: int = 2
    io_size: int = 16 << 20
    direct: bool = True
    verify: bool = True
    prefault_dest: bool = True  # fault fresh destination pages in ahead of the readers

    def native(self, notify: bool = False) -> "_native.LoadOptions":
        o = _native.LoadOptions()
        o.readers, o.copiers, o.io_size, o.direct, o.notify = self.readers, self.copiers, self.io_size, self.direct, notify
        o.prefault_dest = self.prefault_dest
        return o


def file_job(path: str, nbytes: int, block_size: int, crcs, *, dest: int = 0, chunks=()) -> "_native.FileJob":
    job = _native.FileJob()
    job.path, job.nbytes, job.block_size = path, nbytes, block_size
    job.crcs = list(crcs)
    job.dest = dest
    job.chunks = list(chunks)
    return job


def raise_for(task: "_native.LoadTask") -> None:
    kind = task.error_kind
    if kind:
        raise _ERRORS.get(kind, LoadError)(task.error_message)


def run(jobs: list, pool=None, options: LoadOptions | None = None) -> dict:
    """Runs jobs to the end (GIL released while waiting); returns the task's stats."""
    options = options or LoadOptions()
    task = _native.LoadTask(jobs, pool.native if pool is not None else None, options.native())
    try:
        task.wait()
    except BaseException:  # e.g. KeyboardInterrupt: stop the threads before leaving
        task.cancel()
        task.wait()
        raise
    raise_for(task)
    return task.stats()


def run_to_cuda(jobs: list, pool, buffers: list, options: LoadOptions | None = None, streams: int = 4) -> dict:
    """Reads jobs into (pinned) pool chunks and copies each finished chunk to its
    job's buffer: non-blocking copies spread over `streams` streams per CUDA device."""
    import torch

    options = options or LoadOptions()
    pool.pin()
    cuda_streams = {d: [torch.cuda.Stream(device=d) for _ in range(streams)]
                    for d in {b.device for b in buffers if b.device.type == "cuda"}}
    host_views = {}
    task = _native.LoadTask(jobs, pool.native, options.native(notify=True))
    issued = 0
    try:
        while True:
            item = task.next_completed(0.5)
            if item is None:
                continue
            job_index, chunk_index = item
            if job_index < 0:
                break
            job = jobs[job_index]
            chunk = job.chunks[chunk_index]
            offset = chunk_index * pool.chunk_size
            length = min(pool.chunk_size, job.nbytes - offset)
            src = host_views.get(chunk)
            if src is None:
                src = host_views[chunk] = chunk_tensor(pool, chunk)
            target = buffers[job_index]
            if target.device.type == "cuda":
                with torch.cuda.stream(cuda_streams[target.device][issued % streams]):
                    target[offset:offset + length].copy_(src[:length], non_blocking=True)
            else:
                target[offset:offset + length].copy_(src[:length])
            issued += 1
        task.wait()
    except BaseException:
        task.cancel()
        task.wait()
        raise
    finally:
        for per_device in cuda_streams.values():
            for s in per_device:
                s.synchronize()
    raise_for(task)
    return task.stats()


def chunk_tensor(pool, chunk: int):
    """A uint8 tensor over one pool chunk (no copy), the source of a device copy."""
    import ctypes

    import torch
    raw = (ctypes.c_uint8 * pool.chunk_size).from_address(pool.address(chunk))
    return torch.frombuffer(raw, dtype=torch.uint8)
