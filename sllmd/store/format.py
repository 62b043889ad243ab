"""The on-disk checkpoint format (DESIGN.md section 2): names, layout rules,
and validated reading of the manifest and the tensor index.

    <checkpoint>/
      manifest.json       magic, format version, partitions (+ block checksums),
                          execution files, model description
      index.json          tensor name -> partition, offset, nbytes, shape,
                          stride, storage_offset, dtype
      model/              execution files: config.json, generation_config.json,
                          tokenizer files (whatever the model needs to run)
      data-00000.bin ...  one data file per partition; its byte layout is the
                          layout of that partition's device buffer

manifest.json is written last and the directory is renamed into place, so a
directory without a readable manifest is never a checkpoint.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CorruptCheckpointError, NotACheckpointError, UnsupportedVersionError

MAGIC = "sllm-checkpoint"
FORMAT_VERSION = (1, 0)  # (major, minor): a newer major is refused, a newer minor is read
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.json"
EXEC_DIR = "model"
TENSOR_ALIGN = 256  # every tensor's storage starts at a multiple of this
FILE_ALIGN = 4096  # every data file's length is a multiple of this (O_DIRECT)
BLOCK_SIZE = 1 << 20  # checksum block
CHECKSUM = "crc32c"


def align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def partition_file(index: int) -> str:
    return f"data-{index:05d}.bin"


@dataclass(frozen=True)
class TensorEntry:
    name: str
    partition: int
    offset: int  # byte offset of the tensor's storage in the partition file
    nbytes: int  # byte length of that storage (shared storages appear once per view)
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int  # in elements, within the storage
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {
            "partition": self.partition, "offset": self.offset, "nbytes": self.nbytes,
            "shape": list(self.shape), "stride": list(self.stride),
            "storage_offset": self.storage_offset, "dtype": self.dtype,
        }


@dataclass(frozen=True)
class Partition:
    index: int
    file: str
    nbytes: int  # file length, a multiple of FILE_ALIGN
    device: str | None = None  # the parallelism plan's device for it, if any
    crcs: tuple[int, ...] = ()  # CRC-32C per BLOCK_SIZE block; empty = none stored

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "nbytes": self.nbytes, "device": self.device, "crcs": list(self.crcs)}


@dataclass
class Manifest:
    partitions: list[Partition]
    block_size: int = BLOCK_SIZE
    checksum: str | None = CHECKSUM
    files: list[str] = field(default_factory=list)  # execution files under model/
    model: dict[str, Any] = field(default_factory=dict)  # e.g. architecture, dtype, source
    version: tuple[int, int] = FORMAT_VERSION

    @property
    def total_bytes(self) -> int:
        return sum(p.nbytes for p in self.partitions)

    def to_json(self) -> dict[str, Any]:
        return {
            "magic": MAGIC, "format_version": list(self.version), "block_size": self.block_size,
            "checksum": self.checksum, "partitions": [p.to_json() for p in self.partitions],
            "files": self.files, "model": self.model,
        }


@dataclass
class Checkpoint:
    """A validated view of a checkpoint directory (no tensor data read)."""

    path: Path
    manifest: Manifest
    tensors: dict[str, TensorEntry]

    def data_path(self, partition: Partition) -> Path:
        return self.path / partition.file

    def exec_dir(self) -> Path:
        return self.path / EXEC_DIR


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"{path}: unreadable {what}: {e}") from e


def read_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    if not path.is_dir():
        raise NotACheckpointError(f"{path}: not a checkpoint (not a directory)")
    try:
        raw = _read_json(path / MANIFEST_FILE, "manifest")
    except FileNotFoundError:
        raise NotACheckpointError(f"{path}: not a checkpoint (no {MANIFEST_FILE})") from None
    if not isinstance(raw, dict) or raw.get("magic") != MAGIC:
        raise NotACheckpointError(f"{path}: not a checkpoint ({MANIFEST_FILE} lacks the magic {MAGIC!r})")
    try:
        major, minor = (int(v) for v in raw["format_version"])
        if major != FORMAT_VERSION[0]:
            raise UnsupportedVersionError(
                f"{path}: checkpoint format version {major}.{minor} is not supported "
                f"(this sllm reads {FORMAT_VERSION[0]}.x); upgrade sllm or re-convert the model")
        block_size = int(raw["block_size"])
        checksum = raw.get("checksum")
        parts = []
        for i, p in enumerate(raw["partitions"]):
            part = Partition(i, str(p["file"]), int(p["nbytes"]), p.get("device"),
                             tuple(int(c) for c in p.get("crcs") or ()))
            if "/" in part.file or part.nbytes % FILE_ALIGN:
                raise CorruptCheckpointError(f"{path}: partition {i} is malformed: {p!r:.200}")
            if checksum and len(part.crcs) != -(-part.nbytes // block_size):
                raise CorruptCheckpointError(f"{path}: partition {i} has {len(part.crcs)} block checksums, "
                                             f"expected {-(-part.nbytes // block_size)}")
            parts.append(part)
        return Manifest(parts, block_size, checksum, [str(f) for f in raw.get("files", [])],
                        dict(raw.get("model") or {}), (major, minor))
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptCheckpointError(f"{path}: malformed {MANIFEST_FILE}: {type(e).__name__}: {e}") from e


def read_index(path: Path, manifest: Manifest) -> dict[str, TensorEntry]:
    try:
        raw = _read_json(path / INDEX_FILE, "tensor index")
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{path}: the tensor index {INDEX_FILE} is missing") from None
    tensors: dict[str, TensorEntry] = {}
    try:
        for name, t in raw["tensors"].items():
            entry = TensorEntry(name, int(t["partition"]), int(t["offset"]), int(t["nbytes"]),
                                tuple(int(s) for s in t["shape"]), tuple(int(s) for s in t["stride"]),
                                int(t["storage_offset"]), str(t["dtype"]))
            if not 0 <= entry.partition < len(manifest.partitions):
                raise ValueError(f"tensor {name!r} names partition {entry.partition}")
            part = manifest.partitions[entry.partition]
            if entry.offset % TENSOR_ALIGN or entry.offset < 0 or entry.offset + entry.nbytes > part.nbytes:
                raise ValueError(f"tensor {name!r} lies outside its partition or is misaligned")
            if len(entry.shape) != len(entry.stride) or min(entry.shape, default=0) < 0:
                raise ValueError(f"tensor {name!r} has a malformed shape/stride")
            tensors[name] = entry
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CorruptCheckpointError(f"{path}: malformed {INDEX_FILE}: {e}") from e
    return tensors


def open_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    manifest = read_manifest(path)
    return Checkpoint(path, manifest, read_index(path, manifest))
