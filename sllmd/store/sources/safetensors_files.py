"""Reading .safetensors files without copying: the header is parsed and
validated here, and every tensor is a view into a private (copy-on-write)
memory map of the file, so converting a model needs no second copy of it in
memory; the bytes stream from the page cache into the checkpoint writer.

File layout (the safetensors format): an 8-byte little-endian header length
N, N bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]},
"__metadata__": {...}}, then the data; offsets are relative to the data start
and the tensors cover the data exactly, without holes or overlaps.
"""
from __future__ import annotations

import json
import logging
import math
import mmap
import os
import struct
from pathlib import Path

import torch

from ...errors import ConversionError

log = logging.getLogger(__name__)

_MAX_HEADER = 100 << 20  # the safetensors library refuses larger headers too

_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "I32": "int32",
    "U32": "uint32", "I64": "int64", "U64": "uint64", "F16": "float16", "BF16": "bfloat16",
    "F32": "float32", "F64": "float64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu", "C64": "complex64", "C128": "complex128",
}


def _torch_dtype(code: str, path: Path, name: str) -> torch.dtype:
    dtype = getattr(torch, _DTYPES.get(code, ""), None)
    if not isinstance(dtype, torch.dtype):
        raise ConversionError(f"{path}: tensor {name!r} has dtype {code!r}, which this converter does not support")
    return dtype


def read_header(path: str | os.PathLike) -> tuple[dict, dict, int]:
    """Returns ({name: entry}, metadata, data start) after validating the header against the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConversionError(f"{path}: not a safetensors file (only {len(head)} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > _MAX_HEADER or 8 + n > size:
                raise ConversionError(f"{path}: corrupt safetensors file: header length {n} does not fit "
                                      f"the file ({size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise ConversionError(f"{path}: cannot read: {e}") from e
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise ConversionError(f"{path}: corrupt safetensors header: {e}") from e
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + n
    data_len = size - start
    spans = []
    for name, entry in header.items():
        try:
            dtype = _torch_dtype(entry["dtype"], path, name)
            shape = [int(s) for s in entry["shape"]]
            lo, hi = (int(v) for v in entry["data_offsets"])
        except ConversionError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise ConversionError(f"{path}: corrupt safetensors header entry for {name!r}: {e}") from e
        if min(shape, default=0) < 0 or not 0 <= lo <= hi:
            raise ConversionError(f"{path}: corrupt safetensors header: {name!r} has shape {shape}, "
                                  f"offsets [{lo}, {hi})")
        want = math.prod(shape) * dtype.itemsize
        if hi - lo != want:
            raise ConversionError(f"{path}: corrupt safetensors header: {name!r} spans {hi - lo} bytes, "
                                  f"its shape {shape} x {entry['dtype']} needs {want}")
        if hi > data_len:
            raise ConversionError(f"{path}: truncated safetensors file: {name!r} ends at byte {start + hi}, "
                                  f"the file has {size}")
        spans.append((lo, hi, name))
    pos = 0
    for lo, hi, name in sorted(spans):
        if lo != pos:
            what = "overlaps another tensor" if lo < pos else f"leaves a hole at data offset {pos}"
            raise ConversionError(f"{path}: corrupt safetensors file: {name!r} {what}")
        pos = hi
    if pos != data_len:
        raise ConversionError(f"{path}: corrupt safetensors file: {data_len - pos} bytes of data after the "
                              f"last tensor (the file may be damaged)")
    return header, metadata, start


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of the file as a zero-copy view into a private memory map, in file order."""
    path = Path(path)
    header, _, start = read_header(path)
    out: dict[str, torch.Tensor] = {}
    if not header:
        return out
    with open(path, "rb") as f:
        # ACCESS_COPY: a private mapping, so torch gets a writable buffer and the file stays untouched.
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    try:
        mm.madvise(mmap.MADV_SEQUENTIAL)
    except (AttributeError, OSError):
        pass
    for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        dtype = _torch_dtype(entry["dtype"], path, name)
        lo, hi = entry["data_offsets"]
        shape = tuple(int(s) for s in entry["shape"])
        if hi == lo:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        raw = torch.frombuffer(mm, dtype=torch.uint8, count=hi - lo, offset=start + lo)
        out[name] = raw.view(dtype).reshape(shape)
    log.debug("mapped %d tensors from %s", len(out), path)
    return out
