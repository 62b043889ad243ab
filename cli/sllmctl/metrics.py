"""sllmctl metrics: the daemon's Prometheus metrics over the local socket (no --http needed)."""
from __future__ import annotations

import sys

from sllmd.client import Client

from .output import print_json


def _families(text: str) -> list[dict]:
    """The text parsed into families of samples (for --json)."""
    from prometheus_client.parser import text_string_to_metric_families
    return [{"name": f.name, "type": f.type, "help": f.documentation,
             "samples": [{"name": s.name, "labels": dict(s.labels), "value": s.value} for s in f.samples]}
            for f in text_string_to_metric_families(text)]


def cmd_metrics(args) -> int:
    with Client(args.socket, timeout=args.timeout) as c:
        text = c.metrics()
    if args.json:
        print_json(_families(text))
        return 0
    sys.stdout.write(text)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "metrics", help="print the daemon's Prometheus metrics (the text format; --json: parsed)",
        description="Print the daemon's Prometheus metrics in the text exposition format, the same text "
                    "`sllmd --http` serves at /metrics, read over the local socket. The output is text, not a "
                    "table; --json prints it parsed into families of samples instead (name, type, help, samples).")
    p.set_defaults(func=cmd_metrics)
