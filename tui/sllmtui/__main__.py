"""sllmtui (also `sllmctl top`): the terminal UI of a local sllmd.

    sllmtui [--socket PATH] [--interval S] [--once [--json]]

--once prints one plain-text snapshot (two updates apart, so the rates are real) and
exits: 0, or 69 when no daemon answers.
"""
from __future__ import annotations

import argparse
import json
import sys

from sllmd.client import DEFAULT_TIMEOUT
from sllmd.errors import Exit, SllmError

MIN_INTERVAL_S, MAX_INTERVAL_S = 0.05, 10.0


def add_options(p: argparse.ArgumentParser, with_globals: bool = True) -> None:
    """top's own options; with_globals False where the caller (sllmctl) adds --socket, --timeout, --json."""
    if with_globals:
        p.add_argument("--socket", metavar="PATH", help="the daemon's socket (default: $SLLMD_SOCKET, else the "
                                                        "per-user path, else /run/sllmd/sllmd.sock)")
        p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                       help="give up on a silent daemon after S seconds (default: %(default)g)")
        p.add_argument("--json", action="store_true", help="with --once: print the update as JSON")
    p.add_argument("--interval", type=float, default=0.5, metavar="S",
                   help="an update from the daemon every S seconds, 0.05-10 (default: %(default)g)")
    p.add_argument("--once", action="store_true", help="print one plain-text snapshot and exit")


def run(args: argparse.Namespace) -> int:
    if not MIN_INTERVAL_S <= args.interval <= MAX_INTERVAL_S:   # the watch request's own bounds
        print(f"sllmtui: error: --interval must be {MIN_INTERVAL_S:g}-{MAX_INTERVAL_S:g} seconds, not {args.interval:g}",
              file=sys.stderr)
        return Exit.USAGE
    if args.once:
        return once(args)
    from .app import SllmTop
    from .host import HostProbe
    probe = HostProbe()
    try:
        SllmTop(socket=args.socket, timeout=args.timeout, interval_s=args.interval, probe=probe).run()
    finally:
        probe.close()
    return 0


def once(args: argparse.Namespace) -> int:
    from .host import HostProbe
    from .rows import render_text
    from .source import first_updates
    from .state import View
    try:
        updates = first_updates(args.socket, args.timeout, args.interval)
    except SllmError as e:
        print(f"sllmtui: daemon unreachable: {e}", file=sys.stderr)
        return int(e.exit_code)
    if args.json:
        json.dump(updates[-1] if updates else {}, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
        return 0
    view, probe = View(), HostProbe()
    try:
        host = None
        for u in updates:
            view.apply(u)
            root = ((view.status.get("tiers") or {}).get("ssd") or {}).get("root")
            host = probe.sample(root)
    finally:
        probe.close()
    sys.stdout.write(render_text(view, host))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sllmtui", description="The terminal UI of sllmd: tiers, throughput, "
                                                            "models, instances, requests, nodes.")
    add_options(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
