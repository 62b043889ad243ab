"""The dtype a model computes in (--compute-dtype), chosen per host and applied at bind time.

The checkpoint on disk (and its DRAM copy) stays as stored; a load that needs
another dtype reads the stored bytes into staging buffers, binds them, then
casts every bound tensor into one new device buffer and lets the staging go.
The device budget counts the cast size (`cast_nbytes`), so a bf16 checkpoint
served in fp32 reserves twice its stored bytes.

auto: on CUDA bf16 where the GPU supports it (fp16 checkpoints stay fp16,
else fp16); on a CPU bf16 for a bf16 checkpoint when the CPU computes bf16
natively (avx512_bf16 or amx_bf16 in /proc/cpuinfo), else fp32 (without
those, bf16 is emulated and ~2.6x slower: 1.0 s against 0.38 s for a 31-token
SmolLM2 prefill on an AVX2-only EPYC). fp16 and fp32 checkpoints compute in
fp32 on a CPU: fp16 is slow there and the upcast is exact.
bench/compute_dtype.py measures prefill and decode per dtype on the host.
"""
from __future__ import annotations

import functools
from typing import Iterable

COMPUTE_DTYPES = ("auto", "bf16", "fp16", "fp32")
_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}
ALIGN = 64  # bytes between tensors in a cast buffer


def parse_compute_dtype(value) -> str:
    """auto, bf16, fp16 or fp32 (bfloat16/float16/float32 accepted); ConfigError otherwise."""
    from sllmd.errors import ConfigError
    text = _ALIASES.get(str(value).strip().lower(), str(value).strip().lower())
    if text not in COMPUTE_DTYPES:
        raise ConfigError(f"not a compute dtype: {value!r} ({', '.join(COMPUTE_DTYPES)})")
    return text


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 dot products in hardware (oneDNN uses them)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def _floating():
    import torch
    return (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def resolve(setting: str, device: str, stored=None):
    """The torch dtype a model stored as `stored` (a torch dtype, a name, or None) computes in on `device`."""
    import torch
    from sllmd.store.model import as_dtype

    setting = parse_compute_dtype(setting)
    if setting != "auto":
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[setting]
    try:
        stored = as_dtype(stored)
    except Exception:
        stored = None  # not a floating dtype
    dev = torch.device(device)
    if dev.type == "cuda":
        if stored == torch.float16:
            return torch.float16
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if stored == torch.bfloat16 and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def _itemsize(dtype) -> int:
    import torch
    return torch.empty((), dtype=dtype).element_size()


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def needs_cast(dtypes: Iterable, target) -> bool:
    return target is not None and any(d in _floating() and d != target for d in dtypes)


def target_for(ckpt, setting: str | None, device: str):
    """The dtype `ckpt`'s tensors are cast to when served on `device`, or None when they stay as stored."""
    from sllmd.store.dtypes import dtype_from_name
    if setting is None:
        return None
    target = resolve(setting, device, ckpt.manifest.model.get("dtype"))
    stored = {dtype_from_name(e.dtype) for e in ckpt.tensors.values()}
    return target if needs_cast(stored, target) else None


def cast_nbytes(ckpt, target) -> int:
    """Bytes of the one buffer `cast_bound` fills for `ckpt`: every distinct tensor view,
    floating ones in `target`, each start aligned to ALIGN."""
    import math
    from sllmd.store.dtypes import dtype_from_name

    seen, total = set(), 0
    for e in ckpt.tensors.values():
        key = (e.partition, e.offset, e.storage_offset, tuple(e.shape), tuple(e.stride), e.dtype)
        if key in seen:
            continue
        seen.add(key)
        dtype = dtype_from_name(e.dtype)
        out = target if dtype in _floating() else dtype
        total = _aligned(total) + math.prod(e.shape) * _itemsize(out)
    return _aligned(total)


def cast_bound(model, target, staging, allocate) -> int:
    """Moves every tensor of `model` that is a view into the `staging` buffers into one
    buffer from allocate(nbytes) (a uint8 tensor), floating ones cast to `target`;
    parameters keep their identity (tied weights stay tied). Afterwards nothing refers
    to the staging buffers. Returns the bytes moved (0 when nothing needed a cast)."""
    import torch

    ptrs = {b.untyped_storage().data_ptr() for b in staging if b.numel()}
    bound = []  # (the dict holding it, its name there, the tensor, its extent key)
    for module in model.modules():
        for holder in (module._parameters, module._buffers):
            for name, t in holder.items():
                if t is not None and t.device.type != "meta" and t.untyped_storage().data_ptr() in ptrs:
                    bound.append((holder, name, t, (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)))
    if not needs_cast((t.dtype for _, _, t, _ in bound), target):
        return 0
    layout: dict[tuple, tuple[int, torch.dtype, torch.Tensor]] = {}
    total = 0
    for _, _, t, key in bound:
        if key not in layout:
            out = target if t.dtype in _floating() else t.dtype
            offset = _aligned(total)
            layout[key] = (offset, out, t)
            total = offset + t.numel() * _itemsize(out)
    buf = allocate(_aligned(total))
    moved = {}
    with torch.no_grad():
        for key, (offset, out, t) in layout.items():
            n = t.numel() * _itemsize(out)
            view = buf[offset:offset + n].view(out).view(t.shape)
            view.copy_(t)
            moved[key] = view
        for holder, name, t, key in bound:
            if isinstance(t, torch.nn.Parameter):
                t.data = moved[key]  # the same Parameter object: ties and references survive
            else:
                holder[name] = moved[key]
    return total
