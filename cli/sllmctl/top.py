"""sllmctl top: the terminal UI (package sllmtui, the `tui` extra: pip install 'sllmd[tui]')."""
from __future__ import annotations

import sys

from sllmd.errors import Exit


def register(subparsers) -> None:
    p = subparsers.add_parser("top", help="the terminal UI: tiers, throughput, models, instances, requests, nodes",
                              description="Watch the daemon live (pushed updates): tier occupancy, host->device "
                                          "and disk throughput, models, instances, requests, cluster nodes. Keys: "
                                          "e evict, p pin/unpin, l load, n next node, q quit.")
    try:
        from sllmtui.__main__ import add_options
    except ImportError:   # textual not installed: the verb says how to get it
        p.set_defaults(func=_missing)
        return
    add_options(p, with_globals=False)
    p.set_defaults(func=_run)


def _run(args) -> int:
    from sllmtui.__main__ import run
    return run(args)


def _missing(args) -> int:
    print("sllmctl: error: `top` needs the tui extra: pip install 'sllmd[tui]'", file=sys.stderr)
    return Exit.ERROR
