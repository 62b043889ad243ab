"""Converting models into checkpoints: a Hugging Face model directory,
.safetensors file(s), a PyTorch checkpoint, or a .gguf file.

Safetensors and PyTorch sources are converted tensor by tensor without
building a model: the tensors are read (memory-mapped) and written with
save_state_dict, and the config/tokenizer files travel along. A GGUF file is
dequantized by transformers into a dense model and saved with save_model.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import CheckpointError, ConversionError
from .dtypes import dtype_name
from .model import as_dtype, cast_floating, count_parameters, save_model
from .sources import GGUF, PYTORCH, SAFETENSORS, Source, open_source
from .sources import safetensors_files, torch_files
from .writer import save_state_dict

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (bytes done, bytes total)
Phase = Callable[..., None]  # (phase, done=0, total=0, unit=""): what a conversion is doing now

GGUF_DEFAULT_DTYPE = torch.bfloat16


def _no_phase(*_args, **_kw) -> None:
    pass


def _check_destination(src: Source, dest: Path, overwrite: bool) -> None:
    if dest.exists() and not overwrite:
        raise ConversionError(f"{dest} already exists (pass overwrite=True to replace it)")
    dest_r = dest.resolve()
    for p in [*src.weights, *([src.root] if src.root else [])]:
        p = p.resolve()
        if p == dest_r or dest_r in p.parents:
            raise ConversionError(f"the destination {dest} holds the source {p}; choose another destination")


def _read_config(src: Source) -> dict[str, Any]:
    config = src.exec_files.get("config.json")
    if config is None:
        return {}
    try:
        raw = json.loads(config.read_text())
        return raw if isinstance(raw, dict) else {}
    except (OSError, ValueError) as e:
        raise ConversionError(f"{config}: unreadable config: {e}") from e


def _main_dtype(tensors: dict[str, torch.Tensor]) -> str | None:
    by_bytes: dict[torch.dtype, int] = {}
    for t in tensors.values():
        if t.is_floating_point():
            by_bytes[t.dtype] = by_bytes.get(t.dtype, 0) + t.numel() * t.element_size()
    return dtype_name(max(by_bytes, key=by_bytes.__getitem__)) if by_bytes else None


def _read_all(src: Source) -> dict[str, torch.Tensor]:
    reader = safetensors_files.read_tensors if src.format == SAFETENSORS else torch_files.read_tensors
    tensors: dict[str, torch.Tensor] = {}
    for f in src.weights:
        part = reader(f)
        dup = sorted(set(part) & set(tensors))
        if dup:
            raise ConversionError(f"{f}: tensors {dup[:5]} also appear in an earlier file")
        tensors.update(part)
    if src.expected is not None and set(tensors) != src.expected:
        lacking = sorted(src.expected - set(tensors))
        extra = sorted(set(tensors) - src.expected)
        raise ConversionError(f"{src.root}: the shards do not match their index "
                              f"(missing {lacking[:5]}, not indexed {extra[:5]})")
    if not tensors:
        raise ConversionError(f"{src.describe()}: holds no tensors")
    return tensors


def _source_info(src: Source) -> dict[str, Any]:
    return {"format": src.format, "files": [p.name for p in src.weights]}


def _convert_tensors(src: Source, dest: Path, dtype: torch.dtype | None, progress: Progress | None,
                     overwrite: bool, on_phase: Phase) -> Path:
    on_phase("reading tensors")
    tensors = cast_floating(_read_all(src), dtype)
    config = _read_config(src)
    archs = config.get("architectures") or []
    info = {
        "architecture": archs[0] if archs else None,
        "model_type": config.get("model_type"),
        "dtype": _main_dtype(tensors),
        "parameters": count_parameters(tensors.values()),
        "source": _source_info(src),
    }
    return save_state_dict(tensors, dest, files=src.exec_files, model=info, overwrite=overwrite, progress=progress)


def _convert_gguf(src: Source, dest: Path, dtype: torch.dtype | None, progress: Progress | None,
                  overwrite: bool, on_phase: Phase) -> Path:
    from .sources.gguf_file import load_gguf

    gguf = src.weights[0]
    t0 = time.perf_counter()
    model, tokenizer = load_gguf(gguf, dtype or GGUF_DEFAULT_DTYPE, on_phase=on_phase)
    log.info("dequantized %s in %.1f s", gguf, time.perf_counter() - t0)
    return save_model(model, dest, tokenizer=tokenizer, model={"source": _source_info(src)},
                      overwrite=overwrite, progress=progress)


def convert(source: str | os.PathLike | Sequence[str | os.PathLike], path: str | os.PathLike, *,
            dtype: str | torch.dtype | None = None, progress: Progress | None = None,
            overwrite: bool = False, on_phase: Phase | None = None) -> Path:
    """Converts `source` into a checkpoint at `path` (written atomically).

    source: a Hugging Face model directory, a .safetensors file or a list of
        them (a config.json beside them is carried along), a PyTorch checkpoint,
        or a .gguf file.
    dtype: cast floating-point weights (default: keep them; bfloat16 for GGUF).
    progress: called with (bytes written, bytes total) while writing.
    on_phase: called with (phase, done, total, unit) before writing, e.g.
        ("dequantizing", 12, 272, "tensors") for each GGUF tensor.
    """
    dest = Path(path)
    try:
        dtype = as_dtype(dtype)
    except CheckpointError as e:
        raise ConversionError(str(e)) from None
    src = open_source(source)
    _check_destination(src, dest, overwrite)
    t0 = time.perf_counter()
    log.info("converting %s into %s", src.describe(), dest)
    try:
        if src.format == GGUF:
            out = _convert_gguf(src, dest, dtype, progress, overwrite, on_phase or _no_phase)
        elif src.format in (SAFETENSORS, PYTORCH):
            out = _convert_tensors(src, dest, dtype, progress, overwrite, on_phase or _no_phase)
        else:  # pragma: no cover - open_source only yields the formats above
            raise ConversionError(f"unknown source format {src.format!r}")
    except CheckpointError as e:
        raise ConversionError(f"cannot convert {src.describe()}: {e}") from e
    log.info("converted %s in %.1f s", src.describe(), time.perf_counter() - t0)
    return out
