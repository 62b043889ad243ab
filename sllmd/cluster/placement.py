"""Locality-aware placement (DESIGN.md section 8): pure functions over node views.

For a request for model M, every alive node n that can serve M gets an estimate of the
time until M answers there, and the smallest wins:

    instance  a loaded, non-saturated instance of M: its queue delay
    dram      M in n's DRAM tier:    q + size / b(dram_device)
    ssd       M only on n's SSD:     q + size / b(ssd_device)   (the pipelined SSD->DRAM->device rate,
                                     else the slowest of its two stages)
    peer      another node holds M and n can fetch from peers: q + size/b(peer_ssd) + size/b(ssd_device)
    repo      the repository offers M and n can fetch from it: q + size/b(repo_ssd) + size/b(ssd_device)
    migration whatever the `migration` hook estimates (section 9)

q is the node's queue delay for a new load (state["queue_delay_s"]). Bandwidths are the node's
measured ones (state["bandwidths"], bytes/s); a path it has not measured borrows the median of
the other nodes' measurements, else DEFAULT_BANDWIDTHS. A node whose view is older than
stale_after_s is unknown: its candidates come after every known one, whatever their estimate.
Ties break toward `prefer` (the coordinating node: no forwarding hop), then the faster path
kind, then the node name, so the decision is deterministic.
"""
from __future__ import annotations

import dataclasses
import heapq
import statistics
from typing import Callable, Iterable

from sllmd.cluster.locality import NodeView

# Only used for a path that no node has measured yet (bytes/s); the probe seeds real values.
DEFAULT_BANDWIDTHS = {"dram_device": 4e9, "ssd_device": 1e9, "ssd_dram": 1e9, "peer_ssd": 0.5e9,
                      "repo_ssd": 0.1e9}
PATH_RANK = {"instance": 0, "dram": 1, "ssd": 2, "peer": 3, "repo": 4, "migration": 5}
CANDIDATE_STATUS = ("alive",)
MAX_CANDIDATES = 8     # tried in turn; more only bloats the request's stats


@dataclasses.dataclass
class Estimate:
    node: str
    path: str          # instance | dram | ssd | peer | repo | migration
    seconds: float
    detail: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Decision:
    winner: Estimate | None
    candidates: list[Estimate]         # in the order to try them: known by estimate, then stale ones
    runner_up: Estimate | None


class _Index:
    """A state's models and instances by name, built once per state dict: a pulled state is
    never changed in place (a new pull is a new dict), so its identity names its contents."""
    __slots__ = ("state", "models", "instances", "fetches")

    def __init__(self, state: dict):
        self.state = state    # kept alive, so its id() stays its own while cached
        models = state.get("models") or []
        if isinstance(models, dict):
            self.models = {k: dict(v, name=k) for k, v in models.items() if isinstance(v, dict)}
        else:
            self.models = {m["name"]: m for m in models if isinstance(m, dict) and "name" in m}
        self.instances = {i["name"]: i for i in state.get("instances") or [] if isinstance(i, dict) and "name" in i}
        self.fetches = _fetches(state)


_INDEX: dict[int, _Index] = {}
_INDEX_MAX = 8192


def _index(state: dict) -> _Index:
    key = id(state)
    ix = _INDEX.get(key)
    if ix is None or ix.state is not state:
        if len(_INDEX) >= _INDEX_MAX:
            _INDEX.clear()
        ix = _INDEX[key] = _Index(state)
    return ix


def _fetches(state: dict) -> bool:
    bws = state.get("bandwidths")
    return bool(bws and (bws.get("peer_ssd") or bws.get("repo_ssd")))


def _models(state: dict) -> dict[str, dict]:
    return _index(state).models


def _instance(state: dict, model: str) -> dict | None:
    return _index(state).instances.get(model)


def _size(info: dict) -> int:
    return int(info.get("checkpoint_bytes") or info.get("ssd_bytes") or info.get("size_bytes") or 0)


class _Fallbacks:
    """Per path, the median of the nodes' measured bandwidths (else the default); computed on
    first use only, since most decisions find every path measured."""

    def __init__(self, views: Iterable[NodeView]):
        self._views = views
        self._values: dict[str, float] | None = None

    def get(self, path: str, default: float) -> float:
        if self._values is None:
            seen: dict[str, list[float]] = {}
            for v in self._views:
                for p, bw in ((v.state or {}).get("bandwidths") or {}).items():
                    if isinstance(bw, (int, float)) and bw > 0:
                        seen.setdefault(p, []).append(float(bw))
            self._values = dict(DEFAULT_BANDWIDTHS)
            self._values.update({p: statistics.median(b) for p, b in seen.items()})
        return self._values.get(path, default)


def _bandwidth(state: dict, path: str, fallbacks: _Fallbacks) -> tuple[float, bool]:
    """(bytes/s, measured on this node)."""
    bw = (state.get("bandwidths") or {}).get(path)
    if isinstance(bw, (int, float)) and bw > 0:
        return float(bw), True
    return fallbacks.get(path, DEFAULT_BANDWIDTHS.get(path, 1e9)), False


def _ssd_rate(state: dict, fallbacks: _Fallbacks) -> tuple[float, str]:
    """SSD -> device: the measured end-to-end rate, else the slowest measured stage."""
    bw, measured = _bandwidth(state, "ssd_device", fallbacks)
    if measured:
        return bw, "ssd_device"
    stages = [(_bandwidth(state, p, fallbacks), p) for p in ("ssd_dram", "dram_device")]
    known = [(b, p) for (b, m), p in stages if m]
    if known:
        return min(known)
    return bw, "ssd_device"


def instance_delay(inst: dict) -> float | None:
    """The queue delay of a loaded instance; None when it is saturated (its queue is full)."""
    if inst.get("state", "loaded") != "loaded":
        return None
    queued = int(inst.get("queued") or 0)
    depth = inst.get("queue_depth")
    if depth is not None and queued >= int(depth):
        return None
    if inst.get("queue_delay_s") is not None:
        return float(inst["queue_delay_s"])
    ahead = int(inst.get("active_requests") or 0) + queued
    return ahead * float(inst.get("service_s") or 0.0)


UNSERVABLE = ("broken", "failed", "importing")


def _holder_cost(state: dict, info: dict, inst: dict | None, fallbacks: _Fallbacks) -> tuple[str, float] | None:
    """(path, seconds) for a node holding the model; None when it cannot serve it now."""
    if info.get("error") or info.get("state") in UNSERVABLE:
        return None
    tiers = info.get("tiers") or ()
    if inst is not None and "device" in tiers:
        delay = instance_delay(inst)   # loaded (saturated or not): loading it again here is no option
        return None if delay is None else ("instance", delay)
    q = float(state.get("queue_delay_s") or 0.0)
    if "dram" in tiers:
        return "dram", q + _size(info) / _bandwidth(state, "dram_device", fallbacks)[0]
    if "ssd" in tiers:
        return "ssd", q + _size(info) / _ssd_rate(state, fallbacks)[0]
    return None


def node_estimates(model: str, view: NodeView, holders: dict[str, int], fallbacks: _Fallbacks,
                   repository: dict[str, int]) -> list[Estimate]:
    """Every way `view`'s node could serve `model`; holders: node -> size of each node's copy."""
    state = view.state or {}
    q = float(state.get("queue_delay_s") or 0.0)
    info = _models(state).get(model)
    out: list[Estimate] = []
    if info is not None:
        inst = _instance(state, model)
        cost = _holder_cost(state, info, inst, fallbacks)
        if cost is None:
            return out
        path, seconds = cost
        if path == "instance":
            detail = {"active": int(inst.get("active_requests") or 0), "queued": int(inst.get("queued") or 0)}
        elif path == "dram":
            bw, measured = _bandwidth(state, "dram_device", fallbacks)
            detail = {"q_s": q, "bytes": _size(info), "bandwidth": bw, "via": "dram_device", "measured": measured}
        else:
            bw, via = _ssd_rate(state, fallbacks)
            detail = {"q_s": q, "bytes": _size(info), "bandwidth": bw, "via": via,
                      "measured": via in (state.get("bandwidths") or {})}
        out.append(Estimate(view.name, path, seconds, detail))
        return out
    ssd_bw, _ = _ssd_rate(state, fallbacks)
    bws = state.get("bandwidths") or {}
    others = {n: s for n, s in holders.items() if n != view.name}
    if others and bws.get("peer_ssd"):   # only a node that can fetch from peers
        source = min(others, key=lambda n: (others[n], n))
        size = others[source]
        bw = float(bws["peer_ssd"])
        out.append(Estimate(view.name, "peer", q + size / bw + size / ssd_bw,
                            {"q_s": q, "bytes": size, "bandwidth": bw, "from": source}))
    if model in repository and bws.get("repo_ssd"):
        size = repository[model]
        bw = float(bws["repo_ssd"])
        out.append(Estimate(view.name, "repo", q + size / bw + size / ssd_bw,
                            {"q_s": q, "bytes": size, "bandwidth": bw}))
    return out


def place(model: str, views: list[NodeView], now: float, *, stale_after_s: float = 10.0,
          exclude: set[str] | frozenset[str] = frozenset(), migration: Callable | None = None,
          prefer: str | None = None, repository: dict[str, int] | None = None,
          max_candidates: int | None = MAX_CANDIDATES) -> Decision:
    """The best option per node for `model` over `views` (alive, not excluded), in the order to
    try them, at most max_candidates of them (None: all). `now` is on the same clock as
    NodeView.fetched_at. migration(model, view) -> Estimate | None adds the option of moving a
    running request away (section 9)."""
    live: list[NodeView] = []
    holding: list[tuple[NodeView, dict, dict | None]] = []
    holders: dict[str, int] = {}
    others: list[NodeView] = []     # no copy, but able to fetch one or asked about by the hook
    for v in views:
        if v.status not in CANDIDATE_STATUS or v.name in exclude:
            continue
        live.append(v)
        state = v.state or {}
        ix = _INDEX.get(id(state))
        if ix is None or ix.state is not state:
            ix = _index(state)
        info = ix.models.get(model)
        if info is not None:
            holding.append((v, info, ix.instances.get(model)))
            if "ssd" in (info.get("tiers") or ()) and now - v.fetched_at <= stale_after_s:
                holders[v.name] = _size(info)
        elif ix.fetches or migration is not None:
            others.append(v)
    fallbacks = _Fallbacks(live)
    best: dict[str, tuple] = {}     # node -> (order key, Estimate or the view to estimate later)

    def offer(key: tuple, payload) -> None:
        old = best.get(key[4])
        if old is None or key < old[0]:
            best[key[4]] = (key, payload)

    repo = repository or {}
    for v, info, inst in holding:
        cost = _holder_cost(v.state or {}, info, inst, fallbacks)
        if cost is not None:
            offer((now - v.fetched_at > stale_after_s, cost[1], v.name != prefer, PATH_RANK[cost[0]], v.name), (v, None))
    for v in others:
        for e in node_estimates(model, v, holders, fallbacks, repo):
            offer((now - v.fetched_at > stale_after_s, e.seconds, v.name != prefer, PATH_RANK.get(e.path, 9),
                   v.name), (v, e))
    if migration is not None:
        for v in live:
            e = migration(model, v)
            if e is not None:
                offer((now - v.fetched_at > stale_after_s, e.seconds, e.node != prefer, PATH_RANK.get(e.path, 9),
                       e.node), (v, e))
    ranked = (sorted(best.values(), key=lambda kp: kp[0]) if max_candidates is None
              else heapq.nsmallest(max_candidates, best.values(), key=lambda kp: kp[0]))
    candidates: list[Estimate] = []
    for key, (v, e) in ranked:
        if e is None:   # a holder: its estimate with details, from the same formula
            e = node_estimates(model, v, holders, fallbacks, repo)[0]
        if key[0]:
            e.detail = dict(e.detail, stale=True, age_s=now - v.fetched_at)
        candidates.append(e)
    winner = candidates[0] if candidates else None
    runner_up = candidates[1] if len(candidates) > 1 else None
    return Decision(winner=winner, candidates=candidates, runner_up=runner_up)
