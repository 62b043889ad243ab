"""Verbs that work on checkpoints directly, without a daemon:

    sllmctl convert SOURCE... DEST [--dtype D] [--overwrite]
    sllmctl inspect PATH|NAME [--json]

Heavy imports (torch, transformers) happen inside the handlers, so that
`sllmctl --help` stays fast.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from .output import Progress, fmt_bytes, fmt_count, print_json, print_table

SYSTEM_STORE = Path("/var/lib/sllmd/store")   # systemd/sllmd.service's StateDirectory
DTYPE_CHOICES = ["bfloat16", "float16", "float32", "float64", "bf16", "fp16", "fp32"]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert a model (HF directory, .safetensors, .gguf) into an sllm checkpoint",
        description="Convert a Hugging Face model directory, one or more .safetensors files, a PyTorch "
                    "checkpoint or a .gguf file into an sllm checkpoint directory (written atomically).")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="a model directory, .safetensors file(s), a PyTorch checkpoint or a .gguf file")
    p.add_argument("dest", metavar="DEST", help="the checkpoint directory to create")
    p.add_argument("--dtype", choices=DTYPE_CHOICES,
                   help="cast floating-point weights (default: as stored; bfloat16 for GGUF)")
    p.add_argument("--overwrite", action="store_true", help="replace DEST if it exists")
    p.set_defaults(func=cmd_convert)

    p = subparsers.add_parser("inspect", help="show a checkpoint's manifest and tensors",
                              description="Show a checkpoint's format, model, execution files, partitions "
                                          "and tensors (reads no tensor data). A model name is looked up in "
                                          "the running daemon (or, without one, in the default store).")
    p.add_argument("path", metavar="PATH|NAME",
                   help="a checkpoint directory, or the name of a model in the daemon's store")
    p.set_defaults(func=cmd_inspect)


# --- convert --------------------------------------------------------------------
def cmd_convert(args: argparse.Namespace) -> int:
    sources, dest = args.sources, args.dest
    from sllmd.store.convert import convert
    from sllmd.store.format import open_checkpoint

    from sllmd.errors import ConversionError

    if Path(dest).exists() and not args.overwrite:
        raise ConversionError(f"{dest} already exists (use --overwrite to replace it)")
    source = sources[0] if len(sources) == 1 else sources
    print(f"sllmctl: converting {', '.join(sources)} -> {dest}", file=sys.stderr)
    progress = Progress("writing", steps=4)
    t0 = time.perf_counter()
    try:
        convert(source, dest, dtype=args.dtype, progress=progress, overwrite=args.overwrite)
    finally:
        progress.end()
    elapsed = time.perf_counter() - t0
    ckpt = open_checkpoint(dest)
    model = ckpt.manifest.model
    if args.json:
        print_json({"path": str(Path(dest).resolve()), "model": model, "tensors": len(ckpt.tensors),
                    "file_bytes": ckpt.manifest.total_bytes, "seconds": elapsed})
        return 0
    what = model.get("architecture") or "tensors"
    dtype = f", {model['dtype']}" if model.get("dtype") else ""
    print(f"converted {what}{dtype}: {len(ckpt.tensors)} tensors, {fmt_bytes(ckpt.manifest.total_bytes)} "
          f"in {elapsed:.1f} s -> {dest}")
    return 0


# --- inspect ----------------------------------------------------------------------
def describe(path: str | Path) -> dict[str, Any]:
    """Everything `inspect --json` prints: manifest, partitions, tensors and totals."""
    from sllmd.errors import SllmError
    from sllmd.store.dtypes import dtype_from_name, itemsize
    from sllmd.store.format import MAGIC, open_checkpoint

    ckpt = open_checkpoint(path)
    m = ckpt.manifest
    tensors: dict[str, Any] = {}
    first_at: dict[tuple[int, int], str] = {}
    elements = tensor_bytes = stored = 0
    for name, e in ckpt.tensors.items():
        numel = math.prod(e.shape)
        try:
            size = numel * itemsize(dtype_from_name(e.dtype))
        except SllmError:
            size = None  # a dtype this torch does not know: still listed
        region = (e.partition, e.offset)
        shares = first_at.get(region)
        if shares is None:
            first_at[region] = name
            stored += e.nbytes
            elements += numel
            tensor_bytes += size or 0
        tensors[name] = {"dtype": e.dtype, "shape": list(e.shape), "stride": list(e.stride),
                         "storage_offset": e.storage_offset, "partition": e.partition, "offset": e.offset,
                         "nbytes": size, "region_nbytes": e.nbytes, "shares_storage_with": shares}
    return {
        "path": str(Path(path).resolve()),
        "magic": MAGIC,
        "format_version": ".".join(map(str, m.version)),
        "model": m.model,
        "files": m.files,
        "checksum": {"scheme": m.checksum, "block_size": m.block_size},
        "partitions": [{"index": p.index, "file": p.file, "nbytes": p.nbytes, "device": p.device,
                        "blocks": len(p.crcs)} for p in m.partitions],
        "tensors": tensors,
        # elements and tensor_bytes count each stored tensor once (not again for views that share it)
        "totals": {"tensors": len(tensors), "stored_tensors": len(first_at), "elements": elements,
                   "tensor_bytes": tensor_bytes, "stored_bytes": stored, "file_bytes": m.total_bytes,
                   "partitions": len(m.partitions)},
    }


def _table(rows: list[list[str]], out: TextIO) -> None:
    print_table(None, rows, out, indent="  ")


def print_description(d: dict[str, Any], out: TextIO) -> None:
    model, totals, ck = d["model"], d["totals"], d["checksum"]
    out.write(f"checkpoint  {d['path']}\n")
    checks = f"{ck['scheme']} per {fmt_bytes(ck['block_size'])} block" if ck["scheme"] else "none"
    out.write(f"format      {d['magic']} {d['format_version']}    checksums: {checks}\n")
    if model:
        params = f", {fmt_count(model['parameters'])} parameters" if model.get("parameters") else ""
        kind = f" ({model['model_type']})" if model.get("model_type") else ""
        out.write(f"model       {model.get('architecture') or '-'}{kind}, {model.get('dtype') or '-'}{params}\n")
        src = model.get("source")
        if isinstance(src, dict):
            out.write(f"source      {src.get('format')}: {', '.join(src.get('files') or [])}\n")
    out.write(f"files       {', '.join(d['files']) or '(none: tensors only)'}\n")
    out.write(f"partitions  {totals['partitions']}, {fmt_bytes(totals['file_bytes'])}\n")
    _table([["#", "file", "size", "device", "blocks"]]
           + [[str(p["index"]), p["file"], fmt_bytes(p["nbytes"]), p["device"] or "-", str(p["blocks"])]
              for p in d["partitions"]], out)
    shared = totals["tensors"] - totals["stored_tensors"]
    out.write(f"tensors     {totals['tensors']}" + (f" ({shared} sharing storage)" if shared else "") + "\n")
    rows = [["name", "dtype", "shape", "size", "part", "offset", ""]]
    for name, t in d["tensors"].items():
        rows.append([name, t["dtype"], "x".join(map(str, t["shape"])) or "()",
                     fmt_bytes(t["nbytes"]) if t["nbytes"] is not None else "?", str(t["partition"]),
                     str(t["offset"]), f"= {t['shares_storage_with']}" if t["shares_storage_with"] else ""])
    _table(rows, out)
    out.write(f"total       {totals['tensors']} tensors, {fmt_count(totals['elements'])} elements, "
              f"{fmt_bytes(totals['stored_bytes'])} stored in {fmt_bytes(totals['file_bytes'])} of files\n")


def checkpoint_path(what: str, socket: str | None, timeout: float) -> Path:
    """`inspect`'s argument as a checkpoint directory: a path as is; a model name (one that is no
    path here) asks the daemon where its checkpoint is, or, with no daemon running, looks in the
    default stores (the per-user one, then the system daemon's)."""
    path = Path(what)
    if path.exists() or "/" in what:
        return path
    from sllmd.client import Client
    from sllmd.config import default_store_dir
    from sllmd.errors import DaemonUnreachableError, ModelNotFoundError

    try:
        with Client(socket=socket, timeout=timeout, client_name="sllmctl inspect") as c:
            return Path(c.show(what)["path"])
    except DaemonUnreachableError:
        if socket:
            raise
    stores = [default_store_dir(os.environ), SYSTEM_STORE]
    for store in stores:
        if (store / "models" / what).is_dir():
            return store / "models" / what
    raise ModelNotFoundError(f"{what} is no checkpoint directory, and no model named {what!r} is in "
                             f"{' or '.join(map(str, stores))} (sllmd is not running to ask)")


def cmd_inspect(args: argparse.Namespace) -> int:
    d = describe(checkpoint_path(args.path, args.socket, args.timeout))
    if args.json:
        print_json(d)
    else:
        print_description(d, sys.stdout)
    return 0
