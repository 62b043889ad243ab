"""Running native load tasks: options, error mapping, and the CUDA copy stage.

A LoadTask reads partition files with reader threads (O_DIRECT where the page
cache does not hold the data), verifies block checksums and, when asked,
copies into destination buffers on copy threads. For CUDA destinations the
last stage is ours: each finished chunk goes to the device with an
asynchronous copy on one of several side streams. Straight from SSD, the
chunks are a small pinned staging ring, reused as soon as their copy is done.
"""
from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass

from .. import _native
from ..errors import (CorruptCheckpointError, LoadCancelledError, LoadError, PoolExhaustedError, SllmError,
                      TruncatedCheckpointError)
from .chunk_pool import DEFAULT_CHUNK_SIZE, ChunkPool

log = logging.getLogger(__name__)

_ERRORS: dict[str, type[SllmError]] = {
    "checksum": CorruptCheckpointError,
    "truncated": TruncatedCheckpointError,
    "missing": CorruptCheckpointError,
    "io": LoadError,
    "internal": LoadError,
    "cancelled": LoadCancelledError,
}

RING_CHUNKS = 12  # per straight-from-SSD CUDA load: 8 readers busy while 4 chunks' copies finish
STAGING_CHUNKS = 2 * RING_CHUNKS  # the process's shared pinned staging: two such loads at once


@dataclass
class LoadOptions:
    readers: int = 8  # 16 MiB requests; with the CRC inline, 4 readers left the disk idle at times
    copiers: int = 2
    io_size: int = 16 << 20
    direct: bool = True
    prefault_dest: bool = True  # fault fresh destination pages in ahead of the readers
    # Test hooks (see csrc/load_task.h): a thread that throws, a job whose O_DIRECT reads are refused.
    debug_throw: str = ""
    debug_throw_foreign: bool = False
    debug_refuse_direct_job: int = -1

    def native(self, notify: bool = False) -> "_native.LoadOptions":
        o = _native.LoadOptions()
        o.readers, o.copiers, o.io_size, o.direct, o.notify = self.readers, self.copiers, self.io_size, self.direct, notify
        o.prefault_dest = self.prefault_dest
        o.debug_throw, o.debug_throw_foreign = self.debug_throw, self.debug_throw_foreign
        o.debug_refuse_direct_job = self.debug_refuse_direct_job
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


class CudaCopies:
    """Asynchronous host -> device copies spread over a few side streams per device.

    The side streams first wait for each device's current stream (the one the
    destination buffers were allocated on); every copy is timed on the GPU, and
    finish() counts the bytes and the time any copy was running (per device, the
    union of the copies' intervals) in the loader counters."""

    def __init__(self, buffers, streams: int = 4):
        import torch
        self._torch = torch
        self._streams: dict = {}
        for device in {b.device for b in buffers if b.device.type == "cuda"}:
            current = torch.cuda.current_stream(device)
            side = [torch.cuda.Stream(device=device) for _ in range(streams)]
            for s in side:
                s.wait_stream(current)
            self._streams[device] = side
        self._used: set[tuple[int, int]] = set()
        self._spans: list = []  # (device, start event, end event)
        self._issued = 0
        self.nbytes = 0

    def copy(self, target, offset: int, src, length: int):
        """target[offset:offset+length] = src[:length]; returns the CUDA event that
        marks the copy done (None for a host target: copied at once)."""
        torch = self._torch
        if target.device.type != "cuda":
            target[offset:offset + length].copy_(src[:length])
            return None
        side = self._streams[target.device]
        stream = side[self._issued % len(side)]
        self._issued += 1
        key = (target.data_ptr(), id(stream))
        if key not in self._used:  # the allocator must not reuse the buffer before this stream is done
            target.record_stream(stream)
            self._used.add(key)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record(stream)
            target[offset:offset + length].copy_(src[:length], non_blocking=True)
            end.record(stream)
        self._spans.append((target.device, start, end))
        self.nbytes += length
        return end

    def finish(self, count: bool = True) -> None:
        """Waits for every copy; the current streams then follow the side streams."""
        for device, side in self._streams.items():
            current = self._torch.cuda.current_stream(device)
            for s in side:
                s.synchronize()
                current.wait_stream(s)
        if count and self._spans:
            _native.record_h2d(self.nbytes, self._busy_ns())

    def _busy_ns(self) -> int:
        total_ms = 0.0
        for device in {d for d, _, _ in self._spans}:
            spans = [(s, e) for d, s, e in self._spans if d == device]
            origin = spans[0][0]
            intervals = sorted((origin.elapsed_time(s), origin.elapsed_time(e)) for s, e in spans)
            lo, hi = intervals[0]
            for a, b in intervals[1:]:
                if a > hi:
                    total_ms += hi - lo
                    lo, hi = a, b
                else:
                    hi = max(hi, b)
            total_ms += hi - lo
        return int(total_ms * 1e6)


def run_to_cuda(jobs: list, pool: ChunkPool, buffers: list, options: LoadOptions | None = None,
                streams: int = 4, ring: list[int] | None = None) -> dict:
    """Reads jobs into (pinned) pool chunks and copies each finished chunk to its
    job's buffer with CudaCopies. With `ring` (pool chunks; jobs without chunks),
    reads go through that bounded staging ring, each chunk reused once its copy is done."""
    options = options or LoadOptions()
    pool.pin()
    copies = CudaCopies(buffers, streams)
    task = _native.LoadTask(jobs, pool.native, options.native(notify=True), list(ring or ()))
    in_flight: collections.deque = collections.deque()  # (event, ring chunk) of copies not yet done
    views: dict[int, object] = {}

    def recycle(block: bool) -> None:
        while in_flight and (block or in_flight[0][0].query()):
            event, chunk = in_flight.popleft()
            event.synchronize()
            task.recycle(chunk)
            block = False

    ok = False
    try:
        while True:
            item = task.next_completed(0.002 if in_flight else 0.5)
            if ring:
                recycle(block=item is None and bool(in_flight))  # nothing read: readers wait for a chunk
            if item is None:
                continue
            job_index, unit, chunk = item
            if job_index < 0:
                break
            job = jobs[job_index]
            offset = unit * pool.chunk_size
            length = min(pool.chunk_size, job.nbytes - offset)
            src = views.get(chunk)
            if src is None:
                src = views[chunk] = chunk_tensor(pool, chunk)
            event = copies.copy(buffers[job_index], offset, src, length)
            if ring and event is None:  # a host target: copied already
                task.recycle(chunk)
            elif ring:
                in_flight.append((event, chunk))
        task.wait()
        ok = True
    except BaseException:
        task.cancel()
        task.wait()
        raise
    finally:
        copies.finish(count=ok)
    raise_for(task)
    return task.stats()


_staging_lock = threading.Lock()
_staging: ChunkPool | None = None


def staging_pool() -> ChunkPool:
    """The process's pinned staging chunks for straight-from-SSD loads to CUDA: made
    and pinned once, on first use, and kept (pinning costs more than it holds)."""
    global _staging
    with _staging_lock:
        if _staging is None:
            _staging = ChunkPool(STAGING_CHUNKS * DEFAULT_CHUNK_SIZE, DEFAULT_CHUNK_SIZE)
            _staging.pin()
        return _staging


def run_to_cuda_staged(jobs: list, buffers: list, options: LoadOptions | None = None,
                       ring_chunks: int = RING_CHUNKS) -> dict:
    """Disk -> a bounded pinned staging ring -> device buffers: at most `ring_chunks`
    chunks of host memory however large the model (fewer for a smaller one). The ring comes from the shared
    staging pool; when concurrent loads hold it all, from a private one of the same size."""
    pool = staging_pool()
    ring = []
    ring_chunks = max(1, min(ring_chunks, sum(-(-j.nbytes // pool.chunk_size) for j in jobs)))
    for n in range(ring_chunks, min(2, ring_chunks) - 1, -1):  # a 1-chunk ring would serialize disk and copies
        try:
            ring = pool.allocate(n)
            break
        except PoolExhaustedError:
            continue
    private = None
    if not ring:
        private = pool = ChunkPool(ring_chunks * DEFAULT_CHUNK_SIZE, DEFAULT_CHUNK_SIZE)
        ring = pool.allocate(ring_chunks)
    try:
        return run_to_cuda(jobs, pool, buffers, options, ring=ring)
    finally:
        pool.release(ring)
        if private is not None:
            private.close()


def chunk_tensor(pool, chunk: int):
    """A uint8 tensor over one pool chunk (no copy), the source of a device copy."""
    import ctypes

    import torch
    raw = (ctypes.c_uint8 * pool.chunk_size).from_address(pool.address(chunk))
    return torch.frombuffer(raw, dtype=torch.uint8)
