"""Writing checkpoints: lay tensors out as device buffers, checksum, and
publish atomically (temporary directory, fsync, rename)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch

from .. import _native
from ..errors import CheckpointError, UnsupportedTensorError
from .dtypes import dtype_name
from .format import (BLOCK_SIZE, CHECKSUM, EXEC_DIR, FILE_ALIGN, INDEX_FILE, MANIFEST_FILE, TENSOR_ALIGN,
                     Manifest, Partition, TensorEntry, align, partition_file)

log = logging.getLogger(__name__)

# The widest element (complex128) is 16 bytes: stored regions start at a multiple of
# it, so every view of a shared storage keeps a whole-element offset.
_REGION_ALIGN = 16

Progress = Callable[[int, int], None]  # (bytes written, bytes total)


@dataclass
class _Region:
    """The bytes of one storage that some tensor views use, stored once."""

    storage: torch.UntypedStorage
    lo: int  # byte range within the storage
    hi: int
    partition: int
    offset: int = 0  # byte offset in the partition file, set by the layout


def _byte_extent(t: torch.Tensor) -> tuple[int, int]:
    size = t.element_size()
    lo = t.storage_offset() * size
    if t.numel() == 0:
        return lo, lo
    last = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return lo, (last + 1) * size


def _plan_regions(state_dict: Mapping[str, torch.Tensor], partition_of: Callable[[str], int]):
    """Groups views by storage; each storage is one region over what its views use."""
    regions: dict[tuple, _Region] = {}
    views: list[tuple[str, torch.Tensor, tuple]] = []
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise UnsupportedTensorError(f"{name!r} is a {type(t).__name__}, not a tensor")
        if t.is_sparse or t.layout != torch.strided:
            raise UnsupportedTensorError(f"{name!r} has layout {t.layout}; only strided tensors can be stored")
        dtype_name(t.dtype)  # refuses quantized dtypes early, with the tensor's name
        if t.device.type == "meta":
            raise UnsupportedTensorError(f"{name!r} is on the meta device and has no data")
        storage = t.untyped_storage()
        key = (storage.device.type, storage.device.index, storage.data_ptr(), storage.nbytes())
        lo, hi = _byte_extent(t)
        part = partition_of(name)
        region = regions.get(key)
        if region is None:
            regions[key] = _Region(storage, lo, hi, part)
        else:
            if region.partition != part:
                raise CheckpointError(f"{name!r} shares storage with a tensor in partition {region.partition} "
                                      f"but is planned for partition {part}")
            if hi > lo:
                region.lo, region.hi = (min(region.lo, lo), max(region.hi, hi)) if region.hi > region.lo else (lo, hi)
        views.append((name, t, key))
    for r in regions.values():
        r.lo -= r.lo % _REGION_ALIGN
    return regions, views


def fsync_dir(path: Path) -> None:
    """Makes a directory's entries (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _BlockChecksummer:
    """CRC-32C per fixed block over a stream written in arbitrary pieces."""

    def __init__(self, block_size: int):
        self.block_size, self.crcs, self.crc, self.fill = block_size, [], 0, 0

    def update(self, data: memoryview) -> None:
        pos = 0
        while pos < len(data):
            take = min(self.block_size - self.fill, len(data) - pos)
            self.crc = _native.crc32c(data[pos:pos + take], self.crc)
            self.fill += take
            pos += take
            if self.fill == self.block_size:
                self.crcs.append(self.crc)
                self.crc, self.fill = 0, 0

    def finish(self) -> list[int]:
        if self.fill:
            self.crcs.append(self.crc)
        return self.crcs


def _region_bytes(region: _Region) -> memoryview:
    data = region.storage
    if data.device.type != "cpu":
        data = data.cpu()
    flat = torch.empty(0, dtype=torch.uint8).set_(data)
    return memoryview(flat[region.lo:region.hi].numpy())


_ZEROS = bytes(FILE_ALIGN)


def _write_partition(path: Path, regions: list[_Region], nbytes: int, checksums: bool,
                     progress: Callable[[int], None]) -> list[int]:
    summer = _BlockChecksummer(BLOCK_SIZE) if checksums else None

    def emit(f, data) -> None:
        f.write(data)
        if summer:
            summer.update(memoryview(data))
        progress(len(data))

    with open(path, "wb") as f:
        pos = 0
        for r in sorted(regions, key=lambda r: r.offset):
            if r.offset > pos:
                emit(f, _ZEROS[:r.offset - pos])
            data = _region_bytes(r)
            for start in range(0, len(data), 64 << 20):  # bounded pieces keep progress live
                emit(f, data[start:start + (64 << 20)])
            pos = r.offset + len(data)
        while pos < nbytes:
            pad = min(len(_ZEROS), nbytes - pos)
            emit(f, _ZEROS[:pad])
            pos += pad
        f.flush()
        os.fsync(f.fileno())
    return summer.finish() if summer else []


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, *,
                    partitions: int | Callable[[str], int] | Mapping[str, int] = 1,
                    devices: list[str | None] | None = None,
                    checksums: bool = True,
                    files: Mapping[str, str | os.PathLike | bytes] | None = None,
                    model: Mapping | None = None,
                    overwrite: bool = False,
                    progress: Progress | None = None) -> Path:
    """Saves tensors as a checkpoint directory at `path`, atomically.

    partitions: a count (tensors are spread by size, largest first), or a plan
        mapping each tensor name to a partition number.
    devices: the parallelism plan's device per partition (recorded, used by
        load_state_dict(device="auto")).
    files: execution files to carry (name -> source path or bytes), e.g.
        config.json and tokenizer files; they land under model/.
    model: a description recorded in the manifest (architecture, dtype, ...).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} already exists (pass overwrite=True to replace it)")
    if isinstance(partitions, int):
        if partitions < 1:
            raise CheckpointError("partitions must be >= 1")
        count = partitions
        plan = _balance(state_dict, count)
        partition_of = plan.__getitem__
    elif callable(partitions):
        partition_of = partitions
        count = None
    else:
        plan = dict(partitions)
        missing = set(state_dict) - set(plan)
        if missing:
            raise CheckpointError(f"the partition plan does not place {sorted(missing)[:5]}")
        partition_of = plan.__getitem__
        count = None
    regions, views = _plan_regions(state_dict, partition_of)
    if count is None:
        count = 1 + max((r.partition for r in regions.values()), default=0)
    if any(r.partition < 0 or r.partition >= count for r in regions.values()):
        raise CheckpointError("the partition plan names a negative partition")
    if devices is not None and len(devices) != count:
        raise CheckpointError(f"{len(devices)} devices given for {count} partitions")

    # Layout: each partition is a device buffer; regions are packed, 256-aligned.
    sizes = [0] * count
    members: list[list[_Region]] = [[] for _ in range(count)]
    for r in regions.values():
        r.offset = align(sizes[r.partition], TENSOR_ALIGN)
        sizes[r.partition] = r.offset + (r.hi - r.lo)
        members[r.partition].append(r)
    sizes = [align(s, FILE_ALIGN) for s in sizes]
    total = sum(sizes)

    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        written = 0

        def advance(n: int) -> None:
            nonlocal written
            written += n
            if progress:
                progress(written, total)

        parts = []
        for i in range(count):
            crcs = _write_partition(tmp / partition_file(i), members[i], sizes[i], checksums, advance)
            parts.append(Partition(i, partition_file(i), sizes[i], devices[i] if devices else None, tuple(crcs)))
        index = {}
        for name, t, key in views:
            r = regions[key]
            start = t.storage_offset() * t.element_size() - r.lo
            if t.numel() == 0 and not 0 <= start <= r.hi - r.lo:
                start = 0  # an empty view's offset addresses no bytes
            index[name] = TensorEntry(name, r.partition, r.offset, r.hi - r.lo, tuple(t.shape), tuple(t.stride()),
                                      start // t.element_size(), dtype_name(t.dtype)).to_json()
        exec_names = _write_exec_files(tmp, files or {})
        index_sha256 = _write_json(tmp / INDEX_FILE, {"tensors": index})
        manifest = Manifest(parts, BLOCK_SIZE, CHECKSUM if checksums else None, exec_names, dict(model or {}),
                            index_sha256=index_sha256)
        _write_json(tmp / MANIFEST_FILE, manifest.to_json())  # last: its presence marks a whole checkpoint
        fsync_dir(tmp)
        _publish(tmp, path, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved %d tensors (%d bytes in %d partitions) to %s", len(views), total, count, path)
    return path


def _balance(state_dict: Mapping[str, torch.Tensor], count: int) -> dict[str, int]:
    """Spreads storages over `count` partitions by size (largest first, into the emptiest)."""
    if count == 1:
        return {name: 0 for name in state_dict}
    by_storage: dict[int, list[str]] = {}
    sizes: dict[int, int] = {}
    for name, t in state_dict.items():
        key = t.untyped_storage().data_ptr() if t.untyped_storage().nbytes() else id(t)
        by_storage.setdefault(key, []).append(name)
        sizes[key] = max(sizes.get(key, 0), t.untyped_storage().nbytes())
    load = [0] * count
    plan = {}
    for key in sorted(by_storage, key=lambda k: -sizes[k]):
        target = min(range(count), key=load.__getitem__)
        load[target] += sizes[key]
        for name in by_storage[key]:
            plan[name] = target
    return plan


def _write_json(path: Path, obj) -> str:
    """Writes obj as compact JSON, fsync'd; returns the SHA-256 of the bytes written."""
    data = json.dumps(obj, separators=(",", ":")).encode()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def _write_exec_files(tmp: Path, files: Mapping[str, str | os.PathLike | bytes]) -> list[str]:
    if not files:
        return []
    exec_dir = tmp / EXEC_DIR
    exec_dir.mkdir()
    for name, src in files.items():
        if "/" in name or name.startswith("."):
            raise CheckpointError(f"execution file name {name!r} must be a plain file name")
        dst = exec_dir / name
        if isinstance(src, bytes):
            dst.write_bytes(src)
        else:
            shutil.copyfile(src, dst)
        with open(dst, "rb") as f:
            os.fsync(f.fileno())
    fsync_dir(exec_dir)
    return sorted(files)


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    if path.exists():
        if not overwrite:
            raise CheckpointError(f"{path} already exists")
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)
    fsync_dir(path.parent)
