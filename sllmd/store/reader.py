"""Loading checkpoints: one buffer per partition, filled by the native
pipeline, and every tensor a view into it (no per-tensor copies)."""
from __future__ import annotations

import logging
import os
import time
from typing import Mapping

import torch

from ..errors import CheckpointError
from ..pool import buffers, pipeline
from ..pool.pipeline import LoadOptions
from .dtypes import dtype_from_name
from .format import Checkpoint, Partition, TensorEntry, open_checkpoint

log = logging.getLogger(__name__)

DeviceSpec = str | torch.device | Mapping[int, str]


def partition_devices(ckpt: Checkpoint, device: DeviceSpec) -> list[torch.device]:
    """Device per partition: one device for all, "auto" for the saved plan, or a mapping."""
    parts = ckpt.manifest.partitions
    if isinstance(device, Mapping):
        missing = [p.index for p in parts if p.index not in device]
        if missing:
            raise CheckpointError(f"the device map places no device for partitions {missing}")
        return [torch.device(device[p.index]) for p in parts]
    if device == "auto":
        return [torch.device(p.device or "cpu") for p in parts]
    return [torch.device(device)] * len(parts)


def tensor_views(ckpt: Checkpoint, partition_buffers: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor as a view into its partition's buffer; shared storages stay shared."""
    out: dict[str, torch.Tensor] = {}
    for name, e in ckpt.tensors.items():
        out[name] = _view(partition_buffers[e.partition], e)
    return out


def _view(buffer: torch.Tensor, e: TensorEntry) -> torch.Tensor:
    dtype = dtype_from_name(e.dtype)
    size = torch.empty((), dtype=dtype).element_size()
    t = torch.empty(0, dtype=dtype, device=buffer.device)
    return t.set_(buffer.untyped_storage(), e.offset // size + e.storage_offset, e.shape, e.stride)


def load_partitions(ckpt: Checkpoint, device: DeviceSpec = "cpu", *, verify: bool = True,
                    arena: "buffers.HostArena | None" = None, options: LoadOptions | None = None) -> list[torch.Tensor]:
    """Reads every partition file into a fresh device buffer."""
    devices = partition_devices(ckpt, device)
    bufs = [buffers.allocate(p.nbytes, d, arena) for p, d in zip(ckpt.manifest.partitions, devices)]
    fill_partitions(ckpt, bufs, verify=verify, options=options)
    return bufs


def fill_partitions(ckpt: Checkpoint, bufs: list[torch.Tensor], *, verify: bool = True,
                    options: LoadOptions | None = None) -> None:
    """Reads every partition file into its (already allocated) device buffer."""
    options = options or LoadOptions()
    block = ckpt.manifest.block_size
    use_crc = verify and bool(ckpt.manifest.checksum)

    def job(p: Partition, **where):
        return pipeline.file_job(os.fspath(ckpt.data_path(p)), p.nbytes, block, p.crcs if use_crc else (), **where)

    parts = ckpt.manifest.partitions
    host = [i for i, b in enumerate(bufs) if b.device.type == "cpu" and parts[i].nbytes]
    if host:
        pipeline.run([job(parts[i], dest=bufs[i].data_ptr()) for i in host], options=options)
    for dev in sorted({b.device for b in bufs if b.device.type == "cuda"}, key=str):
        _load_to_cuda(ckpt, [i for i, b in enumerate(bufs) if b.device == dev], bufs, job, options)


def _load_to_cuda(ckpt: Checkpoint, indices: list[int], bufs, job, options: LoadOptions) -> None:
    """Disk -> a bounded pinned staging ring -> device, overlapping (never a host copy of the whole model)."""
    parts = [ckpt.manifest.partitions[i] for i in indices if ckpt.manifest.partitions[i].nbytes]
    if parts:
        pipeline.run_to_cuda_staged([job(p) for p in parts], [bufs[p.index] for p in parts], options)


def load_state_dict(path: str | os.PathLike, device: DeviceSpec = "cpu", *, verify: bool = True,
                    arena: "buffers.HostArena | None" = None,
                    options: LoadOptions | None = None) -> dict[str, torch.Tensor]:
    """Loads a checkpoint's tensors onto `device` ("cpu", "cuda:N", "auto" for the
    saved parallelism plan, or {partition: device}). Block checksums are verified
    while loading unless verify=False; corruption raises CorruptCheckpointError
    naming the file and offset."""
    t0 = time.perf_counter()
    ckpt = open_checkpoint(path)
    bufs = load_partitions(ckpt, device, verify=verify, arena=arena, options=options)
    sd = tensor_views(ckpt, bufs)
    dt = time.perf_counter() - t0
    log.debug("loaded %s: %d bytes in %.3f s (%.2f GB/s)", path, ckpt.manifest.total_bytes, dt,
              ckpt.manifest.total_bytes / dt / 1e9 if dt else 0)
    return sd
