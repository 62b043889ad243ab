"""A checkpoint held in the DRAM chunk pool: the DRAM tier's unit.

Filling it reads the partition files into pool chunks (verified on the way
in); loading from it skips the disk and copies chunks into device buffers.
Its chunks go back to the pool on release(), also when a read fails.
"""
from __future__ import annotations

import logging
import os
import threading

import torch

from .. import _native
from ..pool import ChunkPool, LoadOptions, buffers, pipeline
from ..store.format import Checkpoint
from ..store.reader import partition_devices, tensor_views

log = logging.getLogger(__name__)


class PooledCheckpoint:
    def __init__(self, ckpt: Checkpoint, pool: ChunkPool, chunks: list[list[int]]):
        self.checkpoint = ckpt
        self.pool = pool
        self._chunks = chunks
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self.checkpoint.manifest.total_bytes

    @property
    def chunk_count(self) -> int:
        return sum(len(c) for c in self._chunks)

    @property
    def released(self) -> bool:
        return self._chunks is None

    @classmethod
    def read(cls, ckpt: Checkpoint, pool: ChunkPool, *, verify: bool = True, options: LoadOptions | None = None,
             device_buffers: list[torch.Tensor] | None = None,
             chunks: list[list[int]] | None = None) -> "PooledCheckpoint":
        """SSD -> DRAM chunks. With `device_buffers` (one per partition, host or CUDA),
        the same pass also copies each chunk into them (SSD -> DRAM -> device, pipelined).
        `chunks` (one list per partition, already allocated from `pool`) are used instead of
        allocating; they are taken over (released if the read fails)."""
        parts = ckpt.manifest.partitions
        chunks = list(chunks) if chunks is not None else []
        try:
            for p in parts[len(chunks):]:
                chunks.append(pool.allocate(pool.chunks_for(p.nbytes)))
            use_crc = verify and bool(ckpt.manifest.checksum)
            on_cuda = device_buffers is not None and any(b.device.type == "cuda" for b in device_buffers)
            jobs, targets = [], []
            for p, c in zip(parts, chunks):
                if not p.nbytes:
                    continue
                # Host destinations are filled by the native copy stage; CUDA ones by ours.
                dest = device_buffers[p.index].data_ptr() if device_buffers is not None and not on_cuda else 0
                jobs.append(pipeline.file_job(os.fspath(ckpt.data_path(p)), p.nbytes, ckpt.manifest.block_size,
                                              p.crcs if use_crc else (), dest=dest, chunks=c))
                targets.append(device_buffers[p.index] if on_cuda else None)
            if jobs and on_cuda:
                pipeline.run_to_cuda(jobs, pool, targets, options)
            elif jobs:
                pipeline.run(jobs, pool, options)
        except BaseException:
            for c in chunks:
                pool.release(c)
            raise
        return cls(ckpt, pool, chunks)

    def load_partitions(self, device="cpu", *, arena: buffers.HostArena | None = None,
                        threads: int = 2) -> list[torch.Tensor]:
        """DRAM -> one fresh device buffer per partition (no disk access)."""
        devices = partition_devices(self.checkpoint, device)
        bufs = [buffers.allocate(p.nbytes, d, arena) for p, d in zip(self.checkpoint.manifest.partitions, devices)]
        self.load_into(bufs, threads=threads)
        return bufs

    def load_into(self, bufs: list[torch.Tensor], *, threads: int = 2) -> None:
        """DRAM -> the given device buffers, one per partition (a DRAM-tier hit in the counters)."""
        with self._lock:
            if self._chunks is None:
                raise RuntimeError("this pooled checkpoint was released")
            parts = self.checkpoint.manifest.partitions
            cuda = [i for i, b in enumerate(bufs) if b.device.type == "cuda" and parts[i].nbytes]
            for p, buf, c in zip(parts, bufs, self._chunks):
                if p.nbytes and buf.device.type == "cpu":
                    self.pool.native.copy_out(c, p.nbytes, buf.data_ptr(), threads)
            if cuda:
                self._copy_to_cuda([(self._chunks[i], parts[i].nbytes, bufs[i]) for i in cuda])
            _native.record_dram_hit(sum(p.nbytes for p in parts))

    def load_state_dict(self, device="cpu", *, arena: buffers.HostArena | None = None) -> dict[str, torch.Tensor]:
        return tensor_views(self.checkpoint, self.load_partitions(device, arena=arena))

    def _copy_to_cuda(self, work: list[tuple[list[int], int, torch.Tensor]], streams: int = 4) -> None:
        """(chunks, nbytes, buffer) triples: pinned chunks -> CUDA buffers, asynchronously."""
        self.pool.pin()
        copies = pipeline.CudaCopies([buf for _, _, buf in work], streams)
        cs = self.pool.chunk_size
        ok = False
        try:
            for chunks, nbytes, buf in work:
                for i, chunk in enumerate(chunks):
                    off = i * cs
                    n = min(cs, nbytes - off)
                    copies.copy(buf, off, pipeline.chunk_tensor(self.pool, chunk), n)
            ok = True
        finally:
            copies.finish(count=ok)

    def release(self) -> None:
        """Gives the chunks back to the pool (idempotent)."""
        with self._lock:
            if self._chunks is None:
                return
            for c in self._chunks:
                self.pool.release(c)
            self._chunks = None

    def __repr__(self) -> str:
        return f"PooledCheckpoint({self.checkpoint.path}, {self.nbytes} bytes, {self.chunk_count} chunks)"
