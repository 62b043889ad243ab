"""The on-disk checkpoint format (DESIGN.md section 2): names, layout rules,
and validated reading of the manifest and the tensor index.

    <checkpoint>/
      manifest.json       magic, format version, partitions (+ block checksums),
                          execution files, model description, SHA-256 of
                          index.json and of the manifest itself (since 1.1)
      index.json          tensor name -> partition, offset, nbytes, shape,
                          stride, storage_offset, dtype
      model/              execution files: config.json, generation_config.json,
                          tokenizer files (whatever the model needs to run)
      data-00000.bin ...  one data file per partition; its byte layout is the
                          layout of that partition's device buffer

manifest.json is written last and the directory is renamed into place, so a
directory without a readable manifest is never a checkpoint. Reading trusts
nothing: every field is type-checked, both JSON files are checksummed, and every
tensor view's extent is checked against its bytes, so a damaged file is refused
with an error naming it instead of yielding a wrong view.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, CorruptCheckpointError, NotACheckpointError, UnsupportedVersionError

MAGIC = "sllm-checkpoint"
# (major, minor): a newer major is refused; a newer minor is read (it only adds fields).
# 1.1 added index_sha256 and manifest_sha256; 1.0 checkpoints (without them) still open.
FORMAT_VERSION = (1, 1)
CHECKSUMMED_SINCE = (1, 1)
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

    index_sha256: str | None = None  # of index.json's bytes

    @property
    def total_bytes(self) -> int:
        return sum(p.nbytes for p in self.partitions)

    def to_json(self) -> dict[str, Any]:
        raw = {
            "magic": MAGIC, "format_version": list(self.version), "block_size": self.block_size,
            "checksum": self.checksum, "partitions": [p.to_json() for p in self.partitions],
            "files": self.files, "model": self.model,
        }
        if self.index_sha256 is not None:
            raw["index_sha256"] = self.index_sha256
            raw["manifest_sha256"] = manifest_sha256(raw)
        return raw


def manifest_sha256(raw: dict[str, Any]) -> str:
    """SHA-256 of the manifest's canonical JSON (sorted keys, no spaces) without its own
    checksum field: it covers every field, also those a newer minor version adds."""
    body = {k: v for k, v in raw.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise CorruptCheckpointError(f"{path}: unreadable {what}: {e}") from e


def _parse_json(data: bytes, path: Path, what: str) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CorruptCheckpointError(f"{path}: unreadable {what}: {e}") from e


def _int(value: Any, what: str, low: int = 0) -> int:
    """An integer >= low (JSON floats, bools and strings are refused, not coerced)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{what} must be an integer >= {low}, not {value!r:.60}")
    return value


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise ValueError(f"{what} must be a list of integers, not {value!r:.60}")
    return tuple(_int(v, what) for v in value)


def _plain_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or "/" in value or "\0" in value or value.startswith("."):
        raise ValueError(f"{what} must be a plain file name, not {value!r:.60}")
    return value


def _partition(i: int, p: Any, block_size: int, checksum: str | None) -> Partition:
    if not isinstance(p, dict):
        raise ValueError(f"partition {i} is a {type(p).__name__}, not an object")
    crcs = _ints(p.get("crcs") or [], f"partition {i} crcs")
    if any(c >= 1 << 32 for c in crcs):
        raise ValueError(f"partition {i} has a block checksum wider than 32 bits")
    device = p.get("device")
    if device is not None and not isinstance(device, str):
        raise ValueError(f"partition {i} device must be a string or null, not {device!r:.60}")
    part = Partition(i, _plain_name(p["file"], f"partition {i} file"), _int(p["nbytes"], f"partition {i} nbytes"),
                     device, crcs)
    if part.nbytes % FILE_ALIGN:
        raise ValueError(f"partition {i} is {part.nbytes} bytes, not a multiple of {FILE_ALIGN}")
    if checksum and len(part.crcs) != -(-part.nbytes // block_size):
        raise ValueError(f"partition {i} has {len(part.crcs)} block checksums, expected {-(-part.nbytes // block_size)}")
    return part


def read_manifest(path: str | Path) -> Manifest:
    """The validated manifest; anything malformed raises CorruptCheckpointError naming the file."""
    path = Path(path)
    if not path.is_dir():
        raise NotACheckpointError(f"{path}: not a checkpoint (not a directory)")
    file = path / MANIFEST_FILE
    try:
        raw = _parse_json(_read_bytes(file, "manifest"), file, "manifest")
    except FileNotFoundError:
        raise NotACheckpointError(f"{path}: not a checkpoint (no {MANIFEST_FILE})") from None
    if not isinstance(raw, dict) or raw.get("magic") != MAGIC:
        raise NotACheckpointError(f"{path}: not a checkpoint ({MANIFEST_FILE} lacks the magic {MAGIC!r})")
    try:
        version = raw["format_version"]
        if not isinstance(version, list) or len(version) != 2:
            raise ValueError(f"format_version must be [major, minor], not {version!r:.60}")
        major, minor = _int(version[0], "format_version"), _int(version[1], "format_version")
        if major != FORMAT_VERSION[0]:
            raise UnsupportedVersionError(
                f"{path}: checkpoint format version {major}.{minor} is not supported "
                f"(this sllm reads {FORMAT_VERSION[0]}.x); upgrade sllm or re-convert the model")
        stored_sum = raw.get("manifest_sha256")
        index_sum = raw.get("index_sha256")
        if (major, minor) >= CHECKSUMMED_SINCE and (stored_sum is None or index_sum is None):
            raise ValueError(f"a {major}.{minor} manifest must carry manifest_sha256 and index_sha256")
        if stored_sum is not None and stored_sum != manifest_sha256(raw):
            raise CorruptCheckpointError(f"{file}: checksum mismatch (manifest_sha256): the manifest is corrupt")
        if index_sum is not None and not (isinstance(index_sum, str) and len(index_sum) == 64):
            raise ValueError(f"index_sha256 must be a SHA-256 hex digest, not {index_sum!r:.80}")
        block_size = _int(raw["block_size"], "block_size", low=1)
        if block_size % FILE_ALIGN:
            raise ValueError(f"block_size {block_size} is not a multiple of {FILE_ALIGN}")
        checksum = raw.get("checksum")
        if checksum not in (None, CHECKSUM):
            raise ValueError(f"checksum {checksum!r:.60} is not {CHECKSUM!r} (the only block checksum known)")
        partitions = raw["partitions"]
        if not isinstance(partitions, list):
            raise ValueError(f"partitions must be a list, not {partitions!r:.60}")
        parts = [_partition(i, p, block_size, checksum) for i, p in enumerate(partitions)]
        if len({p.file for p in parts}) != len(parts):
            raise ValueError("two partitions name the same data file")
        files = raw.get("files", [])
        if not isinstance(files, list):
            raise ValueError(f"files must be a list, not {files!r:.60}")
        files = [_plain_name(f, "an execution file") for f in files]
        model = raw.get("model") or {}
        if not isinstance(model, dict):
            raise ValueError(f"model must be an object, not {model!r:.60}")
        return Manifest(parts, block_size, checksum, files, model, (major, minor), index_sum)
    except (KeyError, TypeError, ValueError) as e:
        what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        raise CorruptCheckpointError(f"{file}: malformed {MANIFEST_FILE}: {what}") from e


def _entry(name: str, t: Any, manifest: Manifest) -> TensorEntry:
    """One index entry, with its view's extent checked against its bytes and its partition."""
    from .dtypes import dtype_from_name, itemsize

    if not isinstance(t, dict):
        raise ValueError(f"tensor {name!r} is a {type(t).__name__}, not an object")
    if not isinstance(t["dtype"], str):
        raise ValueError(f"tensor {name!r} dtype must be a string")
    entry = TensorEntry(name, _int(t["partition"], f"tensor {name!r} partition"),
                        _int(t["offset"], f"tensor {name!r} offset"), _int(t["nbytes"], f"tensor {name!r} nbytes"),
                        _ints(t["shape"], f"tensor {name!r} shape"), _ints(t["stride"], f"tensor {name!r} stride"),
                        _int(t["storage_offset"], f"tensor {name!r} storage_offset"), t["dtype"])
    if entry.partition >= len(manifest.partitions):
        raise ValueError(f"tensor {name!r} names partition {entry.partition} of {len(manifest.partitions)}")
    part = manifest.partitions[entry.partition]
    if entry.offset % TENSOR_ALIGN or entry.offset + entry.nbytes > part.nbytes:
        raise ValueError(f"tensor {name!r} lies outside its partition or is misaligned "
                         f"(bytes {entry.offset}+{entry.nbytes} of {part.nbytes})")
    if len(entry.shape) != len(entry.stride):
        raise ValueError(f"tensor {name!r} has {len(entry.shape)} dimensions but {len(entry.stride)} strides")
    size = itemsize(dtype_from_name(entry.dtype))
    numel = 1
    for n in entry.shape:
        numel *= n
    if numel >= 1 << 62 or max(entry.stride, default=0) >= 1 << 62:
        raise ValueError(f"tensor {name!r} has an impossible shape or stride {entry.shape}/{entry.stride}")
    last = entry.storage_offset + sum((n - 1) * s for n, s in zip(entry.shape, entry.stride)) if numel else -1
    end = max(entry.storage_offset, last + 1) * size
    if end > entry.nbytes:
        raise ValueError(f"tensor {name!r} ({entry.dtype}{list(entry.shape)}, stride {list(entry.stride)}, "
                         f"storage offset {entry.storage_offset}) reaches byte {end} of its {entry.nbytes}")
    return entry


def read_index(path: Path, manifest: Manifest) -> dict[str, TensorEntry]:
    """The validated tensor index; a checksum mismatch or a view outside its bytes raises
    CorruptCheckpointError naming index.json."""
    file = path / INDEX_FILE
    try:
        data = _read_bytes(file, "tensor index")
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{path}: the tensor index {INDEX_FILE} is missing") from None
    if manifest.index_sha256 is not None and hashlib.sha256(data).hexdigest() != manifest.index_sha256:
        raise CorruptCheckpointError(f"{file}: checksum mismatch (index_sha256 in {MANIFEST_FILE}): "
                                     f"the tensor index is corrupt")
    raw = _parse_json(data, file, "tensor index")
    tensors: dict[str, TensorEntry] = {}
    try:
        if not isinstance(raw, dict) or not isinstance(raw.get("tensors"), dict):
            raise ValueError('it must be an object with a "tensors" object')
        for name, t in raw["tensors"].items():
            tensors[name] = _entry(name, t, manifest)
    except (KeyError, TypeError, ValueError) as e:
        what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        raise CorruptCheckpointError(f"{path}: malformed {INDEX_FILE}: {what}") from e
    except CheckpointError as e:  # an unknown dtype
        raise CorruptCheckpointError(f"{file}: {e}") from e
    return tensors


def open_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    manifest = read_manifest(path)
    return Checkpoint(path, manifest, read_index(path, manifest))
