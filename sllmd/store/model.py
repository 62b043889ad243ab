"""Transformers models as checkpoints: save a model with its execution files,
and load one ready for generation.

Loading builds the model on `meta` (no memory, no random init), binds the
checkpoint's tensors -- views into one buffer per partition -- with
`load_state_dict(assign=True)`, re-ties tied weights, and places the
non-persistent buffers (rotary `inv_freq`, ...) that a checkpoint does not hold
on the target device. Nothing is left on `meta` afterwards.
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import CheckpointError, LoadError
from .dtypes import dtype_name
from .format import EXEC_DIR, open_checkpoint
from .reader import load_state_dict
from .writer import save_state_dict

log = logging.getLogger(__name__)

_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                  "float": "float32", "fp64": "float64", "double": "float64"}
_CASTABLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Keys old checkpoints carry that current models compute instead (causal masks, rotary tables, positions).
# accelerate's init_empty_weights (and transformers' own loading contexts) patch
# nn.Module.register_parameter for the whole process while a model is built: a
# module constructed or bound in another thread at that moment would get its
# parameters sent to `meta`. Every construction and bind in sllm takes turns.
MODEL_CONSTRUCTION_LOCK = threading.RLock()

_LEGACY_UNEXPECTED = (r"rotary_emb\.inv_freq$", r"(^|\.)position_ids$", r"\.attn\.(masked_)?bias$")


def as_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """torch.bfloat16, "bfloat16", "bf16", ... -> a floating torch dtype (None stays None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        result = dtype
    else:
        name = str(dtype).lower().removeprefix("torch.")
        result = getattr(torch, _DTYPE_ALIASES.get(name, name), None)
    if dtype is not None and result not in _CASTABLE:
        raise CheckpointError(f"dtype {dtype!r} is not one of {', '.join(dtype_name(d) for d in _CASTABLE)}")
    return result


def cast_floating(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Casts the float16/bfloat16/float32/float64 tensors to `dtype`; shared storages stay shared."""
    if dtype is None:
        return dict(state_dict)
    out, done = {}, {}
    for name, t in state_dict.items():
        if t.dtype not in _CASTABLE or t.dtype == dtype:
            out[name] = t
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key not in done:
            done[key] = t.to(dtype)
        out[name] = done[key]
    return out


def count_parameters(tensors) -> int:
    """Elements over distinct tensors (tied weights count once)."""
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel()
    return total


def model_info(model) -> dict[str, Any]:
    """What the manifest records about a transformers model."""
    config = model.config
    return {
        "architecture": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "dtype": dtype_name(model.dtype),
        "parameters": count_parameters(model.parameters()),
        "tied_weights": sorted(_tied_keys(model)),
    }


def _tied_keys(model) -> dict[str, str]:
    keys = getattr(model, "all_tied_weights_keys", None)
    if keys is None:  # transformers 4.x
        keys = {k: "" for k in getattr(model, "_tied_weights_keys", None) or []} \
            if getattr(model.config, "tie_word_embeddings", False) else {}
    return dict(keys)


def _execution_files(model, tokenizer, where: Path) -> dict[str, Path]:
    model.config.save_pretrained(where)
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(model, "can_generate", lambda: False)():
        gen.save_pretrained(where)
    if tokenizer is not None:
        tokenizer.save_pretrained(where)
    files = {}
    for p in sorted(where.iterdir()):
        if p.is_file():
            files[p.name] = p
        else:
            log.warning("not carrying %s: execution files must be plain files", p.name)
    return files


def save_model(model, /, path: str | os.PathLike, tokenizer=None, **save_state_dict_kwargs) -> Path:
    """Saves a transformers model: its state dict (tied weights stored once) plus
    config.json, generation_config.json and the tokenizer's files under model/.
    Extra keyword arguments go to save_state_dict (partitions=, devices=,
    overwrite=, progress=, ...); `files=` adds files, `model=` adds manifest fields."""
    if getattr(model.config, "quantization_config", None) is not None or getattr(model, "hf_quantizer", None):
        raise CheckpointError(f"{type(model).__name__} is quantized ({type(getattr(model, 'hf_quantizer', None)).__name__}); "
                              f"its packed weights cannot be stored as a checkpoint: load it dequantized first")
    state_dict = model.state_dict()
    leftovers = [k for k, t in state_dict.items() if t.device.type == "meta"]
    if leftovers:
        raise CheckpointError(f"cannot save {len(leftovers)} tensors that are on meta (no data): {leftovers[:5]}")
    info = model_info(model)
    info.update(save_state_dict_kwargs.pop("model", None) or {})
    extra = dict(save_state_dict_kwargs.pop("files", None) or {})
    with tempfile.TemporaryDirectory(prefix="sllm-exec-") as tmp:
        files = _execution_files(model, tokenizer, Path(tmp))
        files.update(extra)
        return save_state_dict(state_dict, path, files=files, model=info, **save_state_dict_kwargs)


def _model_class(config, architecture: str | None):
    import transformers
    from transformers import AutoModelForCausalLM, PreTrainedModel

    names = [architecture] + list(getattr(config, "architectures", None) or [])
    for name in filter(None, names):
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            return cls
    return AutoModelForCausalLM


def build_empty_model(path: str | os.PathLike, *, dtype: torch.dtype | None = None, architecture: str | None = None):
    """The model a checkpoint (or a directory with config.json) describes, parameters on `meta`.

    Buffers are built for real by the modules' own constructors (they are
    small): non-persistent ones, which no checkpoint holds, come out exactly as
    in a freshly built model."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    config_dir = path / EXEC_DIR if (path / EXEC_DIR / "config.json").is_file() else path
    if not (config_dir / "config.json").is_file():
        raise LoadError(f"{path}: no config.json among the execution files; this checkpoint holds tensors only "
                        f"(load it with load_state_dict)")
    try:
        config = AutoConfig.from_pretrained(config_dir)
    except (ValueError, KeyError, OSError) as e:
        raise LoadError(f"{config_dir / 'config.json'}: not a usable model config: {e}") from e
    cls = _model_class(config, architecture)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    try:
        with MODEL_CONSTRUCTION_LOCK, init_empty_weights(include_buffers=False):
            if cls is AutoModelForCausalLM:
                model = cls.from_config(config, **kwargs)
            else:
                model = cls._from_config(config, **kwargs)
    except (ValueError, KeyError) as e:
        raise LoadError(f"{path}: cannot build a model for {getattr(config, 'model_type', '?')}: {e}") from e
    return model


def match_prefix(model, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adds or strips the base-model prefix ("transformer.", "model.") when the checkpoint's names lack or have it."""
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix:
        return state_dict
    expected = set(model.state_dict().keys())
    if sum(k in expected for k in state_dict) * 2 > len(state_dict):
        return state_dict
    out = {}
    for k, t in state_dict.items():
        if k not in expected and f"{prefix}.{k}" in expected:
            k = f"{prefix}.{k}"
        elif k not in expected and k.startswith(prefix + ".") and k[len(prefix) + 1:] in expected:
            k = k[len(prefix) + 1:]
        out[k] = t
    return out


def _tie(model, missing: set[str]) -> None:
    import inspect
    if "missing_keys" in inspect.signature(model.tie_weights).parameters:
        model.tie_weights(missing_keys=missing)
    else:
        model.tie_weights()


def _buffer_device(device, state_dict: Mapping[str, torch.Tensor]) -> torch.device:
    if isinstance(device, (str, torch.device)) and str(device) != "auto":
        return torch.device(device)
    for t in state_dict.values():
        return t.device
    return torch.device("cpu")


def bind_state_dict(model, state_dict: Mapping[str, torch.Tensor], device="cpu", *, dtype: torch.dtype | None = None):
    """Binds tensors into a model built by build_empty_model, without copying them (assign=True).

    Missing weights are an error unless tied to a present one; unexpected ones
    are an error unless the model declares them ignorable. Buffers that the
    checkpoint does not hold move to the target device. Returns the model in
    eval mode; raises LoadError if anything is left on `meta`."""
    with MODEL_CONSTRUCTION_LOCK:
        return _bind(model, state_dict, device, dtype)


def key_mismatch(model, missing: set[str], unexpected: set[str]) -> tuple[list[str], list[str]]:
    """(unexpected, missing) tensor names that matter: unexpected ones the model does not
    declare ignorable (nor are legacy buffers), missing ones not tied to a present tensor."""
    tied = _tied_keys(model)
    partners = {**tied, **{v: k for k, v in tied.items() if v}}
    ignorable = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    ignorable += [re.compile(p) for p in _LEGACY_UNEXPECTED]
    extra = sorted(k for k in unexpected if not any(p.search(k) for p in ignorable))
    untied = sorted(k for k in missing if partners.get(k) in (None, "") or partners[k] in missing)
    return extra, untied


def _bind(model, state_dict, device, dtype):
    sd = match_prefix(model, cast_floating(state_dict, dtype))
    result = model.load_state_dict(sd, strict=False, assign=True)
    missing = set(result.missing_keys)
    unexpected, untied = key_mismatch(model, missing, set(result.unexpected_keys))
    if unexpected:
        raise LoadError(f"the checkpoint holds {len(unexpected)} tensors this {type(model).__name__} does not have: "
                        f"{unexpected[:5]} (config and weights do not match)")
    if untied:
        raise LoadError(f"the checkpoint lacks {len(untied)} tensors of this {type(model).__name__}: {untied[:5]}")
    _tie(model, missing)

    target = _buffer_device(device, sd)
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.device.type != "meta" and buf.device != target:
                module._buffers[name] = buf.to(target)
    leftovers = [n for n, t in (*model.named_parameters(remove_duplicate=False),
                                *model.named_buffers(remove_duplicate=False)) if t.device.type == "meta"]
    if leftovers:
        raise LoadError(f"{len(leftovers)} tensors are still on meta after loading (no data for them): "
                        f"{leftovers[:8]}")
    return model.eval()


def apply_generation_config(model, exec_dir: Path) -> None:
    """Restores the generation config saved with the model (or derives it from the model config)."""
    from transformers import GenerationConfig
    if not getattr(model, "can_generate", lambda: False)():
        return
    if (exec_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(exec_dir)
    else:
        model.generation_config = GenerationConfig.from_model_config(model.config)


def load_model(path: str | os.PathLike, device="cpu", *, dtype: str | torch.dtype | None = None,
               verify: bool = True, **load_kwargs):
    """A checkpoint as a transformers model on `device`, in eval mode, ready to generate.

    dtype casts floating weights (default: as stored). verify checks block
    checksums while loading. Other keyword arguments (arena=, options=) go to
    load_state_dict."""
    path = Path(path)
    t0 = time.perf_counter()
    ckpt = open_checkpoint(path)
    dtype = as_dtype(dtype)
    stored = ckpt.manifest.model.get("dtype")
    build_dtype = dtype or (as_dtype(stored) if stored in {dtype_name(d) for d in _CASTABLE} else None)
    model = build_empty_model(path, dtype=build_dtype, architecture=ckpt.manifest.model.get("architecture"))
    t1 = time.perf_counter()
    state_dict = load_state_dict(path, device, verify=verify, **load_kwargs)
    t2 = time.perf_counter()
    bind_state_dict(model, state_dict, device, dtype=dtype)
    apply_generation_config(model, ckpt.exec_dir())
    log.info("loaded %s (%s) on %s: build %.3f s, tensors %.3f s, bind %.3f s", path, type(model).__name__,
             device, t1 - t0, t2 - t1, time.perf_counter() - t2)
    return model


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer stored with a checkpoint (or in a model directory)."""
    from transformers import AutoTokenizer

    path = Path(path)
    exec_dir = path / EXEC_DIR if (path / EXEC_DIR).is_dir() else path
    names = [p.name for p in exec_dir.iterdir()] if exec_dir.is_dir() else []
    # No path in these: in the daemon it would be one inside the store, which tells a user nothing.
    if not any(n.startswith("tokenizer") or n in ("vocab.json", "merges.txt") for n in names):
        raise LoadError("the model has no tokenizer (it was imported without one), so it cannot serve text")
    try:
        return AutoTokenizer.from_pretrained(exec_dir)
    except (ValueError, KeyError, OSError) as e:
        first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise LoadError(f"the model's tokenizer cannot be loaded: {first}") from e
