"""Peer loaders, each returning a dict of CPU tensors, and the rule that forces
every byte into memory the process owns.

Each peer has a `prepare` step (imports, run before the clock starts) and a
`load` step (timed). Whatever `load` returns that still points into a file
mapping of the checkpoint (safetensors' load_file and torch.load(mmap=True)
hand out such views, which read nothing until touched) is copied with
`clone()` in the timed region: that copy is what a loader into a device
buffer has to do. The time up to the copy is reported as the "lazy" time.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from common import file_mappings, in_ranges


def _safetensors(path: Path):
    from safetensors.torch import load_file
    return load_file(str(path), device="cpu")


def _torch_load(path: Path):
    import torch
    return torch.load(str(path), map_location="cpu", weights_only=True, mmap=False)


def _torch_load_mmap(path: Path):
    import torch
    return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)


def _runai(path: Path):
    from runai_model_streamer import SafetensorsStreamer
    with SafetensorsStreamer() as streamer:
        streamer.stream_file(str(path), device="cpu")
        return {name: t for name, t in streamer.get_tensors()}


def _fastsafetensors(path: Path):
    from fastsafetensors import fastsafe_open
    with fastsafe_open(filenames=[str(path)], framework="pt", device="cpu", nogds=True) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _prepare_safetensors():
    import safetensors.torch  # noqa: F401


def _prepare_torch():
    import torch  # noqa: F401


def _prepare_runai():
    import runai_model_streamer  # noqa: F401


def _prepare_fastsafetensors():
    import fastsafetensors  # noqa: F401


# name -> (input format, prepare, load, description)
PEERS: dict[str, tuple[str, Callable, Callable, str]] = {
    "safetensors": ("safetensors", _prepare_safetensors, _safetensors, "safetensors.torch.load_file"),
    "torch.load": ("pt", _prepare_torch, _torch_load, "torch.load(mmap=False)"),
    "torch.load-mmap": ("pt", _prepare_torch, _torch_load_mmap, "torch.load(mmap=True)"),
    "runai": ("safetensors", _prepare_runai, _runai, "runai SafetensorsStreamer(device=cpu)"),
    "fastsafetensors": ("safetensors", _prepare_fastsafetensors, _fastsafetensors,
                        "fastsafetensors fastsafe_open(nogds=True, device=cpu)"),
}


def materialize(sd: dict, files: list[Path]) -> tuple[int, int]:
    """Clones every tensor that still points into a mapping of `files`.
    Returns (tensors copied, bytes copied)."""
    ranges = file_mappings(files)
    if not ranges:
        return 0, 0
    copied = nbytes = 0
    for name, t in sd.items():
        if t.numel() and in_ranges(t.data_ptr(), ranges):
            sd[name] = t.clone()
            copied += 1
            nbytes += t.numel() * t.element_size()
    return copied, nbytes


def still_mapped(sd: dict, files: list[Path]) -> int:
    """How many tensors point into a file mapping (0 after materialize)."""
    ranges = file_mappings(files)
    return sum(1 for t in sd.values() if t.numel() and in_ranges(t.data_ptr(), ranges)) if ranges else 0


def unique_bytes(sd: dict) -> int:
    """Bytes the tensors cover, each storage region counted once (tied weights once)."""
    seen = set()
    total = 0
    for t in sd.values():
        key = (t.data_ptr(), t.numel() * t.element_size())
        if key not in seen:
            seen.add(key)
            total += key[1]
    return total
