"""sllmctl watch: the daemon's events as they happen, one line each (or every update as JSON).

    $ sllmctl watch
    15:02:11.204 load_started     model=smol tier=ssd bytes=270.0MiB
    15:02:11.512 load_progress    model=smol tier=ssd done=140.0MiB total=270.0MiB bandwidth=451.6MiB/s
    15:02:11.790 load_finished    model=smol tier=ssd seconds=0.586 bytes=270.0MiB bandwidth=460.7MiB/s

--json prints every update (snapshot and events, see sllmd.watch) as one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from sllmd.client import Client

from .output import fmt_bytes

BYTE_FIELDS = {"bytes", "done", "total", "size_bytes", "nbytes"}


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0.05 <= value <= 10:
        raise argparse.ArgumentTypeError(f"must be between 0.05 and 10 seconds, not {text!r}")
    return value


def register(sub) -> None:
    p = sub.add_parser("watch", help="print the daemon's events as they happen (loads, evictions, requests, ...)",
                       description="Prints one line per event the daemon pushes (load_started, load_progress, "
                                   "load_finished, load_failed, evicted, request_started, request_finished, "
                                   "migration, node, import_progress) until interrupted; --json prints every "
                                   "update (snapshot and events) as one JSON line.")
    p.add_argument("--interval", type=_interval, default=0.5, metavar="S",
                   help="at most one update every S seconds (0.05 to 10)")
    p.add_argument("--cluster", action="store_true", help="every cluster node's events (and, with --json, snapshot rows)")
    p.add_argument("--count", type=int, default=None, metavar="N", help="stop after N updates (default: none, until interrupted)")
    p.set_defaults(func=cmd_watch)


def fmt_value(key: str, value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if key in BYTE_FIELDS and isinstance(value, int | float):
        return fmt_bytes(value)
    if key == "bandwidth" and isinstance(value, int | float):
        return fmt_bytes(value) + "/s"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    text = str(value)
    return json.dumps(text) if (" " in text or not text) else text


def event_line(event: dict) -> str:
    stamp = event.get("time")
    clock = time.strftime("%H:%M:%S", time.localtime(stamp)) + f".{int(stamp * 1000) % 1000:03d}" \
        if isinstance(stamp, int | float) else "?"
    fields = " ".join(f"{k}={fmt_value(k, v)}" for k, v in event.items() if k not in ("kind", "time"))
    return f"{clock} {str(event.get('kind')):<16} {fields}".rstrip()


def cmd_watch(args) -> int:
    with Client(socket=args.socket, timeout=args.timeout, client_name="sllmctl watch") as c:
        with c.watch(interval_s=args.interval, cluster=args.cluster) as stream:
            for n, update in enumerate(stream, 1):
                if args.json:
                    print(json.dumps(update, separators=(",", ":"), default=str))
                else:
                    if update.get("dropped"):
                        print(f"({update['dropped']} events coalesced or dropped)", file=sys.stderr)
                    for event in update.get("events") or []:
                        print(event_line(event))
                sys.stdout.flush()
                if args.count is not None and n >= args.count:
                    break
    return 0
