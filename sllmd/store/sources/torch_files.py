"""Reading PyTorch pickle checkpoints (pytorch_model.bin and its shards).

Only tensors are unpickled (`weights_only=True`), memory-mapped where the file
allows it; tensors that share storage in the file keep sharing, so the writer
stores tied weights once.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ...errors import ConversionError

log = logging.getLogger(__name__)


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise ConversionError(f"{path}: cannot read: {e}") from e
    except Exception as e:  # unpickling raises many types: all mean "not a usable checkpoint"
        raise ConversionError(f"{path}: not a loadable PyTorch checkpoint: {type(e).__name__}: {e}") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise ConversionError(f"{path}: holds a {type(obj).__name__}, not a state dict of named tensors")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"{path}: entries {bad[:5]} are not tensors")
    log.debug("read %d tensors from %s", len(obj), path)
    return obj
