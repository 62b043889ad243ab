"""This node's locality state (DESIGN.md section 8), as peers pull it and placement reads it.

    {"node", "version", "device", "taken_at",
     "models":    [{name, state, tiers, ssd_bytes, dram_bytes, device_bytes, checkpoint_bytes, pinned, error,
                    load_bytes: what its instance would take of the device budget}],
     "tiers":     {"ssd"|"dram"|"device": {used_bytes, capacity_bytes, free_bytes}},
     "instances": [{name, state, active_requests, queued, leases, device_bytes, queue_depth, service_s,
                    queue_delay_s}],
     "queue_delay_s":  how long a new load waits for the loads in flight (their measured mean time),
     "bandwidths":     {path: bytes/s} measured online (sllmd.cluster.bandwidth),
     "fetch":          ["repo"] when a repository is configured: a path it can fetch by, priced
                       at the default bandwidth until measured,
     "migration":      {a_s_per_token, b0_s, samples}: its migrations' fitted cost (migration_cost),
     "requests":       running/queued requests (Node.requests) where the node lists them}

Everything comes from the real node (models, ps, its tiers' stats, loads in flight) and its
measurements (node.bandwidths, node.service_times: set by Node itself). The version is the
node's, so a peer can tell a pulled copy is current.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
import weakref

from sllmd.cluster.bandwidth import Ewma

log = logging.getLogger(__name__)

MODEL_KEYS = ("name", "state", "tiers", "ssd_bytes", "dram_bytes", "device_bytes", "checkpoint_bytes",
              "pinned", "error")
INSTANCE_KEYS = ("name", "state", "active_requests", "queued", "leases", "device_bytes", "expires_at", "load_tier",
                 "load_s")
DEFAULT_LOAD_S = 1.0   # a load in flight before any load has been timed
MIN_PREFILL_TOKENS = 8   # shorter prompts time the step's overhead more than the per-token rate


@dataclasses.dataclass
class NodeView:
    name: str
    status: str           # alive | suspect | failed | left
    state: dict
    version: int
    fetched_at: float     # time.monotonic() of the pull


class ServiceTimes:
    """Per model, the EWMA of a request's service time (arrival to done, less its queueing),
    and of load times; queue delay estimates come from these."""

    def __init__(self):
        self._service = Ewma()
        self._loads = Ewma()
        self._prefill = Ewma()   # seconds per prompt token: what a migration's destination pays per token

    def observe_request(self, model: str, stats: dict) -> None:
        total, queued = stats.get("total_s"), stats.get("queue_s") or 0.0
        if isinstance(total, (int, float)) and total > 0:
            self._service.add(model, max(float(total) - float(queued), 0.0))
        tokens, prefill = stats.get("prompt_tokens"), stats.get("prefill_s")
        if isinstance(tokens, int) and tokens >= MIN_PREFILL_TOKENS and isinstance(prefill, (int, float)) \
                and prefill > 0 and not stats.get("resumed_at"):
            self._prefill.add("", float(prefill) / tokens)

    def prefill_s_per_token(self) -> float | None:
        """The node's prefill time per token (EWMA over its requests), None before one was timed."""
        return self._prefill.get("")

    def observe_load(self, model: str, seconds: float) -> None:
        if seconds > 0:
            self._loads.add(model, seconds)
            self._loads.add("", seconds)   # every model: the node's mean load time

    def service_s(self, model: str) -> float | None:
        return self._service.get(model)

    def load_s(self, model: str | None = None) -> float | None:
        return self._loads.get(model or "")


def _tier_stats(node) -> dict:
    raw = {"ssd": node.ssd.stats(), "device": node.device.stats(),
           "dram": node.dram.stats() if node.dram is not None else {"used_bytes": 0, "capacity_bytes": 0}}
    out = {}
    for tier, s in raw.items():
        used, cap = int(s.get("used_bytes") or 0), int(s.get("capacity_bytes") or 0)
        out[tier] = {"used_bytes": used, "capacity_bytes": cap, "free_bytes": max(cap - used, 0)}
    return out


def _instances(node, times: ServiceTimes | None) -> list[dict]:
    out = []
    depth = int(getattr(node.config, "queue_depth", 16))
    for row in node.ps():
        inst = {k: row.get(k) for k in INSTANCE_KEYS}
        inst["queue_depth"] = depth
        service = times.service_s(row["name"]) if times is not None else None
        inst["service_s"] = service
        ahead = int(row.get("active_requests") or 0) + int(row.get("queued") or 0)
        inst["queue_delay_s"] = ahead * service if service is not None else (0.0 if ahead == 0 else None)
        out.append(inst)
    return out


_FOOTPRINTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # node -> {(name, imported_at): bytes}


def _load_bytes(node, model: dict) -> int | None:
    """What `model`'s instance takes (or would take) of the node's device budget: its instance's
    size when loaded, else the size a load reserves, computed once per imported checkpoint."""
    if model.get("device_bytes"):
        return int(model["device_bytes"])
    if model.get("state") in ("importing", "broken"):
        return None
    memo = _FOOTPRINTS.setdefault(node, {})
    key = (model["name"], model.get("imported_at"))
    if key not in memo:
        try:
            from sllmd.store import open_checkpoint
            from sllmd.tiers.loader import device_bytes
            ckpt = open_checkpoint(node.ssd.get(model["name"]).path)
            memo[key] = device_bytes(ckpt, node.config.device, getattr(node, "arena", None),
                                     getattr(node.config, "compute_dtype", None))
        except Exception as e:
            log.debug("no device footprint for %s: %s", model["name"], e)
            memo[key] = None
    return memo[key]


def _fetch_paths(node) -> list[str]:
    """The fetching paths this node offers before it has measured them: a repository's when one
    is configured (`--repository`). A peer's is offered once a real transfer measured it: priced
    at a default, it would beat a busy holder for every small model on a fast link's guess."""
    fetcher = getattr(node, "repositories", None)
    return ["repo"] if getattr(fetcher, "repositories", None) else []


def local_state(node) -> dict:
    """The state of `node` now (a started Node); see the module doc for its shape."""
    version = node.version
    times: ServiceTimes | None = getattr(node, "service_times", None)
    bandwidths = getattr(node, "bandwidths", None)
    in_flight = int(node.loads.counts().get("in_flight", 0))
    mean_load = (times.load_s() if times is not None else None) or DEFAULT_LOAD_S
    models = [dict({k: m.get(k) for k in MODEL_KEYS}, load_bytes=_load_bytes(node, m)) for m in node.models()]
    state = {
        "node": getattr(node.config, "node_name", None), "version": version, "device": node.config.device,
        "taken_at": time.time(),
        "models": models,
        "tiers": _tier_stats(node),
        "instances": _instances(node, times),
        "loads_in_flight": in_flight,
        "queue_delay_s": in_flight * mean_load,
        "bandwidths": bandwidths.to_dict() if bandwidths is not None else {},
        "fetch": _fetch_paths(node),
    }
    cost = getattr(node, "migration_cost", None)
    if cost is not None:   # the migration option's a*(t_in + t_out) + b0, as this node measured it
        state["migration"] = cost.to_dict(default_a=times.prefill_s_per_token() if times is not None else None)
    requests = getattr(node, "requests", None)
    if callable(requests):
        try:
            state["requests"] = requests()
        except Exception:
            log.debug("the node's requests are unavailable", exc_info=True)
            state["requests"] = []
    return state


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def state_problem(state) -> str | None:
    """Why a peer's pulled state cannot be used by placement (None: it can). A peer's mistake
    must cost only that peer's view, never the placement of every request."""
    if not isinstance(state, dict):
        return "the state is not a map"
    for key, kind in (("models", list), ("instances", list), ("tiers", dict), ("bandwidths", dict)):
        if key in state and not isinstance(state[key], kind):
            return f"{key} is not a {kind.__name__}"
    for m in state.get("models") or []:
        if not isinstance(m, dict) or not isinstance(m.get("name"), str):
            return "a model entry has no name"
        if not isinstance(m.get("tiers") or [], list):
            return f"model {m['name']!r}: tiers is not a list"
        for k in ("checkpoint_bytes", "ssd_bytes", "dram_bytes", "device_bytes", "load_bytes"):
            if m.get(k) is not None and not _number(m[k]):
                return f"model {m['name']!r}: {k} is not a size"
    for i in state.get("instances") or []:
        if not isinstance(i, dict) or not isinstance(i.get("name"), str):
            return "an instance entry has no name"
        for k in ("active_requests", "queued", "leases", "device_bytes", "queue_depth", "queue_delay_s", "service_s"):
            if i.get(k) is not None and not _number(i[k]):
                return f"instance {i['name']!r}: {k} is not a number"
    if "requests" in state and not isinstance(state["requests"], list):
        return "requests is not a list"
    for r in state.get("requests") or []:
        if not isinstance(r, dict):
            return "a request entry is not a map"
        for k in ("tokens_in", "tokens_out", "max_tokens", "age_s"):
            if r.get(k) is not None and not _number(r[k]):
                return f"request {str(r.get('id'))[:32]!r}: {k} is not a number"
    device = (state.get("tiers") or {}).get("device")
    if device is not None and (not isinstance(device, dict) or any(
            device.get(k) is not None and not _number(device[k]) for k in ("free_bytes", "capacity_bytes"))):
        return "tiers.device is not a map of sizes"
    for path, bw in (state.get("bandwidths") or {}).items():
        if not _number(bw) or bw == 0:
            return f"bandwidth {path!r} is not a positive number"
    fetch = state.get("fetch")
    if fetch is not None and (not isinstance(fetch, list) or not all(isinstance(f, str) for f in fetch)):
        return "fetch is not a list of path names"
    if state.get("queue_delay_s") is not None and not _number(state["queue_delay_s"]):
        return "queue_delay_s is not a number"
    return None
