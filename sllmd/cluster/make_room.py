"""The scheduler's migration option (DESIGN.md sections 8 and 9): free a holder's device by moving
its running requests elsewhere, then load the requested model there.

The paper's case: model M is wanted; node n holds M locally (DRAM or SSD) but its device is full
of busy instances of other models, so loading M there waits for them (device_room). If those
instances' requests can run elsewhere, moving them costs, per request,

    a * (t_in + t_out) + b0       a, b0: n's fit of its own migrations (migration_cost)

(tokens in and out so far, which the state counts, where the paper estimates t_out as duration /
time per token), plus the destination's time to get ready for that model (placement's estimate
of it there, excluding n), and then M's load on n. The moves run in parallel, so the option
costs the slowest move plus the load. placement.place() ranks it with every other option; when
it wins, the coordinator runs the moves (run_moves) and sends the request to n, whose load then
finds the room the moved requests left.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from sllmd.cluster import placement
from sllmd.cluster.device_room import room_for
from sllmd.cluster.locality import NodeView
from sllmd.cluster.migration_cost import DEFAULT_A, DEFAULT_B0

log = logging.getLogger(__name__)

MOVABLE = ("running", "prefill", "queued")   # a request already migrating is not moved again


def _fit(state: dict) -> tuple[float, float]:
    m = state.get("migration") or {}
    a, b0 = m.get("a_s_per_token"), m.get("b0_s")
    ok = all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in (a, b0))
    return (float(a), float(b0)) if ok else (DEFAULT_A, DEFAULT_B0)


def hook(views: list[NodeView], now: float, *, stale_after_s: float, repository: dict | None = None) -> Callable:
    """migration(model, view) -> Estimate | None for placement.place over `views`."""
    destinations: dict[tuple[str, str], placement.Estimate | None] = {}

    def destination(model: str, source: str) -> placement.Estimate | None:
        key = (model, source)
        if key not in destinations:
            d = placement.place(model, views, now, stale_after_s=stale_after_s, exclude={source},
                                repository=repository, max_candidates=1)
            w = d.winner
            destinations[key] = w if w is not None and w.path != "migration" else None
        return destinations[key]

    def option(model: str, view: NodeView) -> placement.Estimate | None:
        state = view.state or {}
        info = placement._models(state).get(model)
        if info is None or info.get("error") or info.get("state") in placement.UNSERVABLE:
            return None
        tiers = info.get("tiers") or ()
        if "device" in tiers or not ("dram" in tiers or "ssd" in tiers):
            return None
        room = room_for(state, info)
        if not room.wait_s:
            return None   # room now (or never): the plain load is the option
        requests = [r for r in state.get("requests") or [] if isinstance(r, dict)]
        a, b0 = _fit(state)
        moves, slowest = [], 0.0
        for victim in room.blocking:
            if victim == model:
                return None
            mine = [r for r in requests if r.get("model") == victim]
            if not mine or any(r.get("state") not in MOVABLE for r in mine):
                return None
            dest = destination(victim, view.name)
            if dest is None:
                return None   # nowhere to run them: nothing to gain
            for r in mine:
                tokens = int(r.get("tokens_in") or 0) + int(r.get("tokens_out") or 0)
                move_s = a * tokens + b0
                slowest = max(slowest, dest.seconds + move_s)
                moves.append({"request_id": r.get("id"), "model": victim, "to": dest.node, "to_path": dest.path,
                              "to_s": dest.seconds, "tokens": tokens, "migration_s": move_s})
        if not moves:
            return None
        rates = placement._index(state).own_rates()
        path = "dram" if "dram" in tiers else "ssd"
        bw = rates[1] if path == "dram" else rates[2]
        if bw is None:
            bw = placement.DEFAULT_BANDWIDTHS["dram_device" if path == "dram" else "ssd_device"]
        load_s = rates[0] + placement._size(info) / bw
        return placement.Estimate(view.name, "migration", slowest + load_s,
                                  {"moves": moves, "load_path": path, "load_s": load_s, "moves_s": slowest,
                                   "room_wait_s": room.wait_s, "a_s_per_token": a, "b0_s": b0})
    return option


def run_moves(estimate: placement.Estimate, migrate: Callable[[str, str, str], dict]) -> list[dict]:
    """Runs the estimate's moves in parallel through migrate(request_id, to, reason) (the node
    running them migrates); what happened to each. A move that fails leaves its request where it
    was: the new model's load then waits for room as it would have (bounded), nothing is lost."""
    moves = list(estimate.detail.get("moves") or [])

    def one(move: dict) -> dict:
        try:
            got = migrate(move["request_id"], move["to"], f"room for a request on {estimate.node}")
            return {"request_id": move["request_id"], "to": move["to"], "ran_on": got.get("ran_on"),
                    "total_s": got.get("total_s"), "ok": got.get("ran_on") == move["to"]}
        except Exception as e:   # finished meanwhile, refused, a peer gone: the load just waits
            log.info("moving %s to %s to make room failed: %s", move["request_id"], move["to"], e)
            return {"request_id": move["request_id"], "to": move["to"], "ok": False,
                    "error": getattr(e, "code", type(e).__name__), "message": str(e)}
    if not moves:
        return []
    with ThreadPoolExecutor(min(len(moves), 8), thread_name_prefix="sllmd-make-room") as pool:
        return list(pool.map(one, moves))
