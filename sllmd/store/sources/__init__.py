"""What a conversion reads from: detection of the source's format, its weight
files, and the execution files (config, tokenizer) that travel with it.

A source is a Hugging Face model directory (config.json + *.safetensors,
possibly sharded with an index, or pytorch_model.bin), one or more
.safetensors files, or a .gguf file. Formats are recognised by their content
(magic bytes), not only by the file name.
"""
from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ...errors import ConversionError

log = logging.getLogger(__name__)

SAFETENSORS, PYTORCH, GGUF = "safetensors", "pytorch", "gguf"

# Execution files worth carrying from a model directory: configs and tokenizers.
_EXEC_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
_NOT_EXEC = (".index.json",)
_SUFFIXES = {".safetensors": SAFETENSORS, ".gguf": GGUF, ".bin": PYTORCH, ".pt": PYTORCH, ".pth": PYTORCH}


@dataclass
class Source:
    format: str  # SAFETENSORS, PYTORCH or GGUF
    weights: list[Path]  # weight files, in reading order
    root: Path | None = None  # the directory execution files come from, if any
    exec_files: dict[str, Path] = field(default_factory=dict)  # name -> path
    expected: set[str] | None = None  # tensor names an index promises, if any

    @property
    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.weights)

    def describe(self) -> str:
        names = ", ".join(p.name for p in self.weights[:3]) + (" ..." if len(self.weights) > 3 else "")
        return f"{self.format} ({names})"


def sniff(path: Path) -> str | None:
    """The weight format of one file, from its first bytes; None if not recognised."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise ConversionError(f"{path}: cannot read: {e}") from e
    if head[:4] == b"GGUF":
        return GGUF
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < (1 << 32):
        return SAFETENSORS
    if head[:4] == b"PK\x03\x04" or head[:2] == b"\x80\x02":  # zip (torch.save) or legacy pickle
        return PYTORCH
    return None


def exec_files_in(root: Path) -> dict[str, Path]:
    """Configs and tokenizer files at the top of a model directory."""
    files = {}
    for p in sorted(root.iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.name.endswith(_EXEC_SUFFIXES) \
                and not p.name.endswith(_NOT_EXEC):
            files[p.name] = p
    return files


def _read_index(path: Path) -> tuple[list[Path], set[str]]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
        names = {str(k): str(v) for k, v in weight_map.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConversionError(f"{path}: malformed shard index: {e}") from e
    shards = []
    for f in dict.fromkeys(names.values()):
        shard = path.parent / f
        if "/" in f or not shard.is_file():
            raise ConversionError(f"{path}: names shard {f!r}, which is missing")
        shards.append(shard)
    return shards, set(names)


def _from_dir(root: Path) -> Source:
    for fmt, index_name, pattern in ((SAFETENSORS, "model.safetensors.index.json", "*.safetensors"),
                                     (PYTORCH, "pytorch_model.bin.index.json", "pytorch_model*.bin")):
        index = root / index_name
        if index.is_file():
            shards, expected = _read_index(index)
            return Source(fmt, shards, root, exec_files_in(root), expected)
        found = sorted(root.glob(pattern))
        if found:
            return Source(fmt, found, root, exec_files_in(root))
    ggufs = sorted(root.glob("*.gguf"))
    if len(ggufs) == 1:
        return Source(GGUF, ggufs, root)
    if ggufs:
        raise ConversionError(f"{root}: holds several .gguf files; name the one to convert")
    raise ConversionError(f"{root}: no model weights found (expected *.safetensors, pytorch_model.bin "
                          f"or a .gguf file)")


def open_source(source: str | os.PathLike | Sequence[str | os.PathLike]) -> Source:
    """Recognises a conversion source; raises ConversionError for anything unusable."""
    paths = [Path(source)] if isinstance(source, (str, os.PathLike)) else [Path(s) for s in source]
    if not paths:
        raise ConversionError("no source given")
    for p in paths:
        if not p.exists():
            raise ConversionError(f"{p}: no such file or directory")
    if len(paths) == 1 and paths[0].is_dir():
        return _from_dir(paths[0])
    formats = []
    for p in paths:
        if p.is_dir():
            raise ConversionError(f"{p}: a directory cannot be combined with other sources")
        fmt = sniff(p) or _SUFFIXES.get(p.suffix.lower())  # a damaged file gets its format's own errors
        if fmt is None:
            raise ConversionError(f"{p}: unknown format (expected .safetensors, .gguf or a PyTorch checkpoint)")
        formats.append(fmt)
    if len(set(formats)) > 1:
        raise ConversionError(f"sources mix formats ({', '.join(sorted(set(formats)))}); convert one model at a time")
    fmt = formats[0]
    if fmt == GGUF and len(paths) > 1:
        raise ConversionError("convert one .gguf file at a time (split GGUF files are not supported)")
    if len(paths) != len(set(p.resolve() for p in paths)):
        raise ConversionError("a source file is named twice")
    parents = {p.resolve().parent for p in paths}
    root = parents.pop() if len(parents) == 1 else None
    exec_files = {}
    if fmt != GGUF and root is not None and (root / "config.json").is_file():
        exec_files = exec_files_in(root)  # a config beside the weights: carry it and its tokenizer
    return Source(fmt, paths, root, exec_files)
