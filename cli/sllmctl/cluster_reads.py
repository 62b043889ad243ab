"""sllmctl's cluster-wide reads: `nodes` (the members) and `requests [--all]` (running and queued)."""
from __future__ import annotations

import sys
import time

from sllmd.client import Client

from .output import fmt_ago, fmt_bytes, fmt_span, print_json, print_table


def _client(args) -> Client:
    return Client(args.socket, timeout=args.timeout)


def _short_key(key: str | None) -> str:
    return "-" if not key else key[:12] + "…"


def _use(state: dict | None, tier: str) -> str:
    t = ((state or {}).get("tiers") or {}).get(tier) or {}
    if not t.get("capacity_bytes"):
        return "-"
    return f"{fmt_bytes(t.get('used_bytes') or 0)}/{fmt_bytes(t['capacity_bytes'])}"


def _node_row(n: dict, now: float) -> list[str]:
    """One `nodes` row; the load columns come from the node's pulled state ("-" before the first pull)."""
    state = n.get("state")
    instances = (state or {}).get("instances") or []
    known = state is not None
    return [str(n.get("name", "?")) + (" *" if n.get("self") else ""), str(n.get("status", "?")),
            str(n.get("endpoint") or "-"), str((state or {}).get("device") or "-"),
            _use(state, "device"), _use(state, "dram"), _use(state, "ssd"),
            str(len(state.get("models") or [])) if known else "-",
            str(sum(int(i.get("active_requests") or 0) for i in instances)) if known else "-",
            str(sum(int(i.get("queued") or 0) for i in instances)) if known else "-",
            fmt_ago(n.get("last_heard"), now), _short_key(n.get("public_key"))]


def cmd_nodes(args) -> int:
    with _client(args) as c:
        nodes = c.nodes()
    if args.json:
        print_json(nodes)
        return 0
    now = time.time()
    print_table(["NAME", "STATUS", "ADDRESS", "DEVICE", "DEVICE USE", "DRAM USE", "SSD USE", "MODELS", "RUNNING",
                 "QUEUED", "LAST HEARD", "KEY"], [_node_row(n, now) for n in nodes])
    return 0


def cmd_requests(args) -> int:
    with _client(args) as c:
        reqs = c.requests(all=args.all)
    if args.json:
        print_json(reqs)
        return 0
    def state(r: dict) -> str:
        to = r.get("migrating_to")
        return f"{r.get('state', '?')} -> {to}" if to else str(r.get("state", "?"))
    rows = [[str(r.get("node", "?")), str(r.get("id", "?"))[:12], str(r.get("model", "?")), state(r),
             "-" if r.get("tokens_in") is None else str(r["tokens_in"]), str(r.get("tokens_out", 0)),
             "-" if r.get("age_s") is None else fmt_span(float(r["age_s"]))] for r in reqs]
    print_table(["NODE", "ID", "MODEL", "STATE", "TOKENS IN", "TOKENS OUT", "AGE"], rows)
    return 0


def cmd_migrate(args) -> int:
    with _client(args) as c:
        out = c.migrate(args.request_id, args.to)
    if args.json:
        print_json(out)
        return 0
    where = out.get("ran_on") or out.get("to")
    pause = out.get("pause_s")
    print(f"request {out.get('request_id')} moved from {out.get('source')} to {where}: {out.get('rounds')} round(s), "
          f"{out.get('tokens_sent')} tokens sent, pause {'-' if pause is None else f'{pause * 1e3:.0f} ms'}, "
          f"{out.get('total_s', 0):.2f} s in all")
    if out.get("fallback"):
        print(f"the destination failed after the handoff ({out['fallback']}); it continues on {where}",
              file=sys.stderr)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("migrate", help="move a running request to another cluster node (live migration)",
                              description="Move the running request REQUEST_ID (see `sllmctl requests --all`) to "
                                          "NODE: NODE loads the model, the request's state (its tokens, not its "
                                          "KV cache) moves at a token boundary and NODE continues it; the client's "
                                          "stream goes on without a gap or a repeated token.")
    p.add_argument("request_id", metavar="REQUEST_ID", help="the request's id, as `sllmctl requests` lists it")
    p.add_argument("--to", required=True, metavar="NODE", help="the node to move it to (required: no default)")
    p.set_defaults(func=cmd_migrate)
    p = subparsers.add_parser("nodes", help="list the cluster's nodes (this node alone without a cluster)",
                              description="list the cluster's nodes (this node alone without a cluster)")
    p.set_defaults(func=cmd_nodes)
    p = subparsers.add_parser("requests", help="list the running and queued requests",
                              description="list the running and queued requests: id, model, state, tokens, age")
    p.add_argument("--all", action="store_true", help="every cluster node's requests")
    p.set_defaults(func=cmd_requests)
