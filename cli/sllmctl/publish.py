"""sllmctl publish SOURCE REPO_DIR --name NAME [--overwrite] [--dtype D]: adds a model to a
repository directory (DESIGN.md section 11), offline: no daemon, in this process.

SOURCE is anything `import` takes (our checkpoint, a HF directory, .safetensors, .gguf); the
checkpoint lands in REPO_DIR/NAME and index.json is rewritten atomically, under a lock, so
concurrent publishers and a web server reading the directory never see half of either.
"""
from __future__ import annotations

import argparse
import sys

from .offline import DTYPE_CHOICES
from .output import Progress, fmt_bytes, print_json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "publish", help="add a model to a repository directory (for sllmd --repository)",
        description="Write SOURCE (our checkpoint, a HF directory, .safetensors, .gguf) into the repository "
                    "directory REPO_DIR as NAME and update its index.json atomically. Serve REPO_DIR with any "
                    "web server (e.g. nginx) and start sllmd with --repository URL.")
    p.add_argument("source", metavar="SOURCE", help="what `import` accepts")
    p.add_argument("repo", metavar="REPO_DIR", help="the repository directory (created if missing)")
    p.add_argument("--name", required=True, help="the model's name in the repository (required: no default)")
    p.add_argument("--overwrite", action="store_true", help="replace a model of that name")
    p.add_argument("--dtype", choices=DTYPE_CHOICES,
                   help="cast floating-point weights when converting (default: as stored; bfloat16 for GGUF)")
    p.set_defaults(func=cmd_publish)


def cmd_publish(args: argparse.Namespace) -> int:
    from sllmd.repository.index import publish

    progress = Progress(f"publishing {args.name}")
    try:
        entry = publish(args.source, args.repo, args.name, overwrite=args.overwrite, progress=progress,
                        dtype=args.dtype)
    finally:
        progress.end()
    if args.json:
        print_json({"name": args.name, "repository": args.repo, **entry.to_json()})
        return 0
    print(f"published {args.name}: {len(entry.files)} files, {fmt_bytes(entry.size_bytes)} -> "
          f"{args.repo}/{entry.path}", file=sys.stdout)
    return 0
