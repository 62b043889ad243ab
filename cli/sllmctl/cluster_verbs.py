"""Cluster verbs that need no daemon:

    sllmctl keygen FILE     a new cluster key (Serf's gossip encryption), mode 0600

Every node of a cluster is started with the same key file (sllmd --cluster-key FILE).
"""
from __future__ import annotations

import argparse
import sys

from .output import print_json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "keygen", help="write a new cluster key file (mode 0600) for sllmd --cluster-key",
        description="Write 32 random bytes, base64, to FILE with mode 0600 (an existing file is never "
                    "overwritten). Copy the file to every node of the cluster and start each sllmd with "
                    "--cluster-key FILE; whoever holds it can join the cluster.")
    p.add_argument("file", metavar="FILE", help="the key file to create")
    p.set_defaults(func=cmd_keygen)


def cmd_keygen(args: argparse.Namespace) -> int:
    from sllmd.cluster.cluster_key import keygen
    keygen(args.file)
    if getattr(args, "json", False):
        print_json({"path": args.file, "mode": "0600"})
    else:
        print(f"wrote a cluster key to {args.file} (mode 0600); start every node with --cluster-key {args.file}",
              file=sys.stderr)
    return 0
