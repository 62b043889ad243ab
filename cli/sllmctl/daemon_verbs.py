"""sllmctl verbs that talk to a running sllmd: import, models, load, ps, evict, rm, pin, unpin, infer, status.

Every verb takes --socket (default $SLLMD_SOCKET, else the daemon's default
path) and --timeout; read verbs take --json. Exit codes: 0 ok, 1 error,
2 usage, 69 daemon not running, 75 busy or timed out.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from sllmd.client import DEFAULT_TIMEOUT, Client
from sllmd.config import ConfigError, parse_duration


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _client(args) -> Client:
    return Client(socket=args.socket, timeout=args.timeout, client_name=f"sllmctl {args.verb}")


def _print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


# --- human formatting -------------------------------------------------------------------------------
def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def fmt_span(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def fmt_ago(ts: float | None, now: float) -> str:
    return "never" if not ts else f"{fmt_span(now - ts)} ago"


def fmt_until(ts: float | None, now: float) -> str:
    if ts is None:
        return "forever"
    return "now" if ts <= now else f"in {fmt_span(ts - now)}"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


# --- verbs ------------------------------------------------------------------------------------------
class _Progress:
    """Import progress on stderr: a live line on a terminal, a line per 10% otherwise."""

    def __init__(self, name: str):
        self.name, self.tty, self.step, self.started = name, sys.stderr.isatty(), -1, time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        pct = 100 * done // total if total else 100
        text = f"importing {self.name}: {pct:3d}% ({fmt_bytes(done)} of {fmt_bytes(total)})"
        if self.tty:
            sys.stderr.write("\r" + text)
        elif pct // 10 != self.step:
            self.step = pct // 10
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def end(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
        sys.stderr.write(f"imported {self.name} in {time.monotonic() - self.started:.1f}s\n")


def cmd_import(args) -> int:
    progress = _Progress(args.name)
    with _client(args) as c:
        info = c.import_model(args.name, args.source, progress=progress)
    progress.end()
    if args.json:
        _print_json(info)
    return 0


def cmd_models(args) -> int:
    with _client(args) as c:
        models = c.models()
    if args.json:
        _print_json(models)
        return 0
    now = time.time()
    rows = [[m.get("name", "?"), fmt_bytes(m.get("size_bytes")), ",".join(m.get("tiers") or []) or "-",
             str(m.get("state", "?")), "yes" if m.get("pinned") else "", fmt_ago(m.get("last_used"), now)]
            for m in models]
    print(table(["NAME", "SIZE", "TIERS", "STATE", "PINNED", "LAST USED"], rows))
    return 0


def cmd_load(args) -> int:
    with _client(args) as c:
        info = c.load(args.name, keep_alive=args.keep_alive)
    if args.json:
        _print_json(info)
    else:
        load = f" from {info['load_tier']} in {info['load_s']:.2f}s" if info.get("load_tier") else ""
        print(f"{args.name} loaded{load}, until {fmt_until(info.get('expires_at'), time.time())}")
    return 0


def cmd_ps(args) -> int:
    with _client(args) as c:
        instances = c.ps()
    if args.json:
        _print_json(instances)
        return 0
    now = time.time()
    rows = [[i.get("name", "?"), fmt_bytes(i.get("size_bytes")), str(i.get("device", "-")),
             ",".join(i.get("tiers") or []) or "-", str(i.get("state", "?")), str(i.get("active_requests", 0)),
             str(i.get("queued", 0)), fmt_until(i.get("expires_at"), now)] for i in instances]
    print(table(["NAME", "SIZE", "DEVICE", "TIERS", "STATE", "ACTIVE", "QUEUED", "UNTIL"], rows))
    return 0


def cmd_evict(args) -> int:
    with _client(args) as c:
        info = c.evict(args.name, tier=args.tier)
    if args.json:
        _print_json(info)
    else:
        gone = ", ".join(info.get("evicted") or []) if isinstance(info, dict) else ""
        print(f"evicted {args.name} from {gone or 'nothing (it was not there)'}")
    return 0


def cmd_rm(args) -> int:
    with _client(args) as c:
        c.remove(args.name)
    print(f"removed {args.name}")
    return 0


def cmd_pin(args) -> int:
    with _client(args) as c:
        (c.pin if args.verb == "pin" else c.unpin)(args.name)
    print(f"{args.verb}ned {args.name}")
    return 0


def cmd_infer(args) -> int:
    out = sys.stdout
    last = ""
    with _client(args) as c:
        stream = c.infer(args.name, args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                         top_p=args.top_p, seed=args.seed, stop=args.stop or None, keep_alive=args.keep_alive,
                         chat=not args.raw)
        with stream:
            for event in stream.events():
                if args.json:
                    out.write(json.dumps(event, default=str) + "\n")
                elif event["type"] == "token" and event["text"]:
                    last = event["text"]
                    out.write(last)
                out.flush()
    if not args.json and not last.endswith("\n"):
        out.write("\n")
    if args.stats and stream.stats is not None:
        sys.stderr.write(json.dumps(stream.stats, default=str) + "\n")
    return 0


def cmd_status(args) -> int:
    with _client(args) as c:
        status = c.status()
    if args.json:
        _print_json(status)
        return 0
    daemon = status.get("daemon", {})
    print(f"sllmd {daemon.get('version', '?')} (protocol {daemon.get('protocol', '?')}), pid {daemon.get('pid', '?')}, "
          f"up {fmt_span(status.get('uptime_s', daemon.get('uptime_s', 0)))}, device {status.get('device', '?')}")
    print(f"socket {daemon.get('socket', '?')}, {daemon.get('requests_in_flight', 0)} request(s) in flight")
    rows = []
    for name, tier in (status.get("tiers") or {}).items():
        cap = tier.get("capacity_bytes")
        used = tier.get("used_bytes", 0)
        pct = f"{100 * used / cap:.0f}%" if cap else "-"
        count = tier.get("models", tier.get("instances", ""))
        rows.append([name, fmt_bytes(used), fmt_bytes(cap) if cap is not None else "unlimited", pct, str(count)])
    print(table(["TIER", "USED", "CAPACITY", "USE", "MODELS"], rows))
    loader = status.get("loader") or {}
    parts = []
    # Reads: bytes over the loads' elapsed time (ns_read is busy time summed over reader threads).
    for what, nbytes, ns in (("read", "bytes_read", "ns_load_wall"), ("copy", "bytes_copied", "ns_copy")):
        if loader.get(ns):
            parts.append(f"{what} {fmt_bytes(loader[nbytes])} at {loader[nbytes] / loader[ns]:.2f} GB/s")
        elif nbytes in loader:
            parts.append(f"{what} {fmt_bytes(loader[nbytes])}")
    if loader:
        print(f"loader: {loader.get('loads', 0)} load(s), {loader.get('failures', 0)} failure(s); " + "; ".join(parts))
    return 0


# --- registration ---------------------------------------------------------------------------------------
def register(subparsers) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--socket", metavar="PATH",
                        help="the daemon's socket (default: $SLLMD_SOCKET or the daemon's default path)")
    common.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                        help=f"give up after S seconds without a sign of life from the daemon ({DEFAULT_TIMEOUT:g})")
    reads = argparse.ArgumentParser(add_help=False)
    reads.add_argument("--json", action="store_true", help="print JSON")

    def verb(name, func, help, *, json_out=True):
        p = subparsers.add_parser(name, parents=[common, reads] if json_out else [common], help=help,
                                  description=help)
        p.set_defaults(func=func)
        return p

    p = verb("import", cmd_import, "import SOURCE (our format, a HF directory, .safetensors, .gguf) as NAME")
    p.add_argument("name")
    p.add_argument("source")
    verb("models", cmd_models, "list the models in the store, with their tiers and states")
    p = verb("load", cmd_load, "load NAME into the device tier")
    p.add_argument("name")
    p.add_argument("--keep-alive", type=_duration, metavar="DUR",
                   help="stay loaded this long once idle (5m, 30s, -1 = forever, 0 = unload after)")
    verb("ps", cmd_ps, "list the running instances")
    p = verb("evict", cmd_evict, "evict NAME from a tier")
    p.add_argument("name")
    p.add_argument("--tier", choices=["device", "dram", "ssd"], default="device",
                   help="device (default) unloads the instance, dram drops the cached copy, ssd removes the model")
    p = verb("rm", cmd_rm, "remove NAME from every tier and the store", json_out=False)
    p.add_argument("name")
    for name, text in (("pin", "keep NAME in the store under capacity pressure"), ("unpin", "undo pin")):
        p = verb(name, cmd_pin, text, json_out=False)
        p.add_argument("name")
    p = verb("infer", cmd_infer, "generate from NAME, streaming the text to stdout")
    p.add_argument("name")
    p.add_argument("prompt")
    p.add_argument("--max-tokens", type=int, metavar="N")
    p.add_argument("--temperature", type=float, metavar="T", help="0 (default) is greedy")
    p.add_argument("--top-p", type=float, metavar="P")
    p.add_argument("--seed", type=int, metavar="S")
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop before TEXT (repeatable)")
    p.add_argument("--keep-alive", type=_duration, metavar="DUR")
    p.add_argument("--raw", action="store_true", help="send PROMPT as is, without the chat template")
    p.add_argument("--stats", action="store_true", help="print the request's stats as JSON on stderr")
    verb("status", cmd_status, "show the daemon's tiers, loader counters and uptime")
