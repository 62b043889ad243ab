"""Stable names for torch dtypes in the tensor index.

Names are the attribute names in the `torch` namespace ("bfloat16",
"float8_e4m3fn", "uint16", "complex64", ...), so every dtype torch has
round-trips, and a dtype this torch does not know fails with a clear error.
"""
from __future__ import annotations

import torch

from ..errors import UnsupportedTensorError

_QUANTIZED = {torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4}


def dtype_name(dtype: torch.dtype) -> str:
    if dtype in _QUANTIZED:
        raise UnsupportedTensorError(f"quantized tensors ({dtype}) cannot be stored; dequantize them first")
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise UnsupportedTensorError(f"dtype {name!r} is not known to this torch ({torch.__version__})")
    return dtype


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size() if dtype.itemsize == 0 else dtype.itemsize
