"""Locality-aware placement (DESIGN.md section 8): pure functions over node views.

For a request for model M, every alive node n that can serve M gets an estimate of the
time until M answers there, and the smallest wins:

    instance  a loaded, non-saturated instance of M: its queue delay
    dram      M in n's DRAM tier:    q + size / b(dram_device)   (q includes the wait for device room
                                     while busy instances fill it: device_room)
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
import math
import statistics
import threading
from typing import Callable, Iterable

import numpy as np

from sllmd.cluster.device_room import room_for
from sllmd.cluster.locality import NodeView

# Only used for a path that no node has measured yet (bytes/s); the probe seeds real values.
DEFAULT_BANDWIDTHS = {"dram_device": 4e9, "ssd_device": 1e9, "ssd_dram": 1e9, "peer_ssd": 0.5e9,
                      "repo_ssd": 0.1e9}
PATH_RANK = {"instance": 0, "dram": 1, "ssd": 2, "peer": 3, "repo": 4, "migration": 5}
CANDIDATE_STATUS = ("alive",)
MAX_CANDIDATES = 8     # tried in turn; more only bloats the request's stats
SMALL = 16             # a views list this short is scanned directly (not through the shared index)
LIST_FETCHERS = 32     # more fetching nodes than this are ranked with arrays, not visited one by one


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
    never changed in place (a new pull is a new dict), so its identity names its contents.
    What depends on the state alone is memoized here too: a holder's cost per model and a
    fetching node's parameters, when they need no other node's bandwidths."""
    __slots__ = ("state", "models", "instances", "fetches", "costs", "fetch", "rates")

    def __init__(self, state: dict):
        self.state = state    # kept alive, so its id() stays its own while cached
        models = state.get("models") or []
        if isinstance(models, dict):
            self.models = {k: dict(v, name=k) for k, v in models.items() if isinstance(v, dict)}
        else:
            self.models = {m["name"]: m for m in models if isinstance(m, dict) and "name" in m}
        self.instances = {i["name"]: i for i in state.get("instances") or [] if isinstance(i, dict) and "name" in i}
        self.fetches = _fetches(state)
        self.costs: dict[str, object] = {}
        self.fetch: tuple | None = None
        self.rates: tuple | None = None

    def holder(self, model: str, fallbacks: "_Fallbacks") -> tuple:
        """(_holder_cost for `model`, held here; the size of its SSD copy or None), memoized unless
        the cost borrowed another node's bandwidth."""
        memo = self.costs.get(model)
        if memo is None:
            info = self.models[model]
            rates = self.own_rates()
            probe = _Probe()
            cost = _holder_cost(self.state, info, self.instances.get(model), probe, rates)
            if cost is not None and probe.borrowed:
                cost = _DYNAMIC
            memo = self.costs[model] = (cost, _size(info) if "ssd" in (info.get("tiers") or ()) else None)
        if memo[0] is _DYNAMIC:
            return _holder_cost(self.state, self.models[model], self.instances.get(model), fallbacks), memo[1]
        return memo

    def fill(self) -> None:
        """Every model's holder memo at once, when the state's rates are its own (the common case):
        a state is indexed once and then answers every model's decision without computing."""
        rates = self.own_rates()
        if rates[1] is None or rates[2] is None:
            return    # some cost borrows the median: computed per call, on demand
        state, costs, inst = self.state, self.costs, self.instances.get
        for name, info in self.models.items():
            if name not in costs:
                costs[name] = (_holder_cost(state, info, inst(name), None, rates),
                               _size(info) if "ssd" in (info.get("tiers") or ()) else None)

    def own_rates(self) -> tuple:
        """(q, DRAM->device, SSD->device) of this state, None for a rate that borrows the median."""
        if self.rates is None:
            dram, ssd = _Probe(), _Probe()
            d, r = _bandwidth(self.state, "dram_device", dram)[0], _ssd_rate(self.state, ssd)[0]
            self.rates = (float(self.state.get("queue_delay_s") or 0.0), None if dram.borrowed else d,
                          None if ssd.borrowed else r)
        return self.rates

    def fetch_static(self) -> tuple:
        """(q, peer_ssd bytes/s or None, repo_ssd bytes/s or None, SSD->device rate or None when it
        borrows the cluster's median) of a fetching node: the state's own values, memoized."""
        if self.fetch is None:
            bws = self.state.get("bandwidths") or {}
            probe = _Probe()
            ssd_bw = _ssd_rate(self.state, probe)[0]
            self.fetch = (float(self.state.get("queue_delay_s") or 0.0),
                          fetch_bandwidth(self.state, "peer_ssd"), fetch_bandwidth(self.state, "repo_ssd"),
                          None if probe.borrowed else ssd_bw)
        return self.fetch

    def fetch_params(self, fallbacks: "_Fallbacks") -> tuple:
        """fetch_static with the SSD->device rate filled in (borrowed from `fallbacks` where needed)."""
        f = self.fetch_static()
        if f[3] is None:
            return f[:3] + (_ssd_rate(self.state, fallbacks)[0],)
        return f


_DYNAMIC = object()    # a memo marker: computed per call (it borrows the cluster's median)


class _Probe:
    """Fallbacks that note being asked: a value computed with them is the state's own (and can be
    memoized with it) unless `borrowed`, whatever the formula does with the answer."""
    __slots__ = ("borrowed",)

    def __init__(self):
        self.borrowed = False

    def get(self, path: str, default: float) -> float:
        self.borrowed = True
        return DEFAULT_BANDWIDTHS.get(path, default)


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


def fetch_bandwidth(state: dict, path: str) -> float | None:
    """bytes/s of a fetching path (peer_ssd, repo_ssd) on this node: measured, else the default
    when the node says it can fetch that way (state["fetch"]: "peer" in a cluster, "repo" with a
    repository configured) but has not yet; None when it cannot."""
    bw = (state.get("bandwidths") or {}).get(path)
    if isinstance(bw, (int, float)) and bw > 0:
        return float(bw)
    return DEFAULT_BANDWIDTHS[path] if path.split("_")[0] in (state.get("fetch") or ()) else None


def _fetches(state: dict) -> bool:
    return fetch_bandwidth(state, "peer_ssd") is not None or fetch_bandwidth(state, "repo_ssd") is not None


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
    """SSD -> device: the measured end-to-end rate, else one made of the two stages (a stage no
    node has measured counts at its fallback, never as free). On a GPU the disk read and the DMA
    copy overlap: the slower stage sets the rate. On a CPU device both stages are copies by the
    same cores through the same memory, so their times add."""
    bw, measured = _bandwidth(state, "ssd_device", fallbacks)
    if measured:
        return bw, "ssd_device"
    (read, read_measured), (copy, copy_measured) = (_bandwidth(state, p, fallbacks) for p in ("ssd_dram", "dram_device"))
    if not (read_measured or copy_measured):
        return bw, "ssd_device"
    if str(state.get("device") or "").startswith("cpu"):   # a state without a device (the simulator's GPUs) overlaps
        return 1.0 / (1.0 / read + 1.0 / copy), "ssd_dram+dram_device"
    return min((read, "ssd_dram"), (copy, "dram_device"))


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


def _holder_cost(state: dict, info: dict, inst: dict | None, fallbacks: _Fallbacks,
                 rates: tuple | None = None) -> tuple[str, float] | None:
    """(path, seconds) for a node holding the model; None when it cannot serve it now. rates:
    the state's (q, DRAM->device, SSD->device) as computed below, None where one borrows (an
    index's memo, so that a state's own values are computed once)."""
    if info.get("error") or info.get("state") in UNSERVABLE:
        return None
    tiers = info.get("tiers") or ()
    if inst is not None and "device" in tiers:
        delay = instance_delay(inst)   # loaded (saturated or not): loading it again here is no option
        return None if delay is None else ("instance", delay)
    q = float(state.get("queue_delay_s") or 0.0) if rates is None else rates[0]
    q += room_for(state, info).wait_s   # a device full of busy instances: the load waits for them
    if "dram" in tiers:
        bw = rates[1] if rates is not None and rates[1] is not None else _bandwidth(state, "dram_device", fallbacks)[0]
        return "dram", q + _size(info) / bw
    if "ssd" in tiers:
        bw = rates[2] if rates is not None and rates[2] is not None else _ssd_rate(state, fallbacks)[0]
        return "ssd", q + _size(info) / bw
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
        if path != "instance":
            room = room_for(state, info)
            if room.wait_s:
                detail.update(room_wait_s=room.wait_s, blocking=list(room.blocking))
        out.append(Estimate(view.name, path, seconds, detail))
        return out
    ssd_bw, _ = _ssd_rate(state, fallbacks)
    bws = state.get("bandwidths") or {}
    others = {n: s for n, s in holders.items() if n != view.name}
    peer_bw, repo_bw = fetch_bandwidth(state, "peer_ssd"), fetch_bandwidth(state, "repo_ssd")
    if others and peer_bw is not None:   # only a node that can fetch from peers
        source = min(others, key=lambda n: (others[n], n))
        size = others[source]
        bw = peer_bw
        out.append(Estimate(view.name, "peer", q + size / bw + size / ssd_bw,
                            {"q_s": q, "bytes": size, "bandwidth": bw, "from": source, "measured": "peer_ssd" in bws}))
    if model in repository and repo_bw is not None:
        size = repository[model]
        bw = repo_bw
        out.append(Estimate(view.name, "repo", q + size / bw + size / ssd_bw,
                            {"q_s": q, "bytes": size, "bandwidth": bw, "measured": "repo_ssd" in bws}))
    return out


class _Holders:
    """Which positions of the views list hold each model, kept across calls: the list of states
    the coordinator passes changes a few states at a time, so only the positions whose state
    dict changed are re-indexed (states are never changed in place; they are kept alive here, so
    an id() seen again is the same dict). place() then visits the nodes that hold the model and
    ranks the nodes that can fetch it with arrays, not node by node. Node names are unique
    (Serf's are)."""

    def __init__(self):
        self.ids: list[int] = []
        self.ixs: list[_Index] = []
        self.by_model: dict[str, dict[int, None]] = {}    # model -> positions (an ordered set)
        self.fetchers: dict[int, None] = {}
        self.dynamic: dict[int, None] = {}     # fetchers whose SSD rate borrows the cluster's median
        self.arrays = np.full((4, 0), np.nan)  # per position: q, peer_ssd, repo_ssd, ssd rate (NaN: none)
        self.names: list[str] = []             # the views' names as last ranked, and their sort order
        self.name_rank = np.zeros(0, dtype=np.int64)
        self.name_pos: dict[str, int] = {}
        self.lock = threading.Lock()

    def _set(self, p: int, ix: "_Index | None") -> None:
        self.fetchers.pop(p, None)
        self.dynamic.pop(p, None)
        self.arrays[:, p] = np.nan
        if ix is not None and ix.fetches:
            self.fetchers[p] = None
            q, peer, repo, ssd = ix.fetch_static()
            if ssd is None:
                self.dynamic[p] = None
            else:
                self.arrays[:, p] = (q, np.nan if peer is None else peer, np.nan if repo is None else repo, ssd)

    def sync(self, states: list[dict]) -> None:
        ids = list(map(id, states))
        if ids == self.ids:
            return
        old, ixs = self.ids, list(self.ixs)
        if len(ids) != len(old):
            grown = np.full((4, len(ids)), np.nan)
            keep = min(len(ids), len(old))
            grown[:, :keep] = self.arrays[:, :keep]
            self.arrays = grown
        changed = [p for p, (a, b) in enumerate(zip(old, ids)) if a != b]
        changed += range(min(len(old), len(ids)), max(len(old), len(ids)))
        for p in changed:
            if p < len(old):
                for m in ixs[p].models:
                    where = self.by_model[m]
                    del where[p]
                    if not where:
                        del self.by_model[m]
                self.fetchers.pop(p, None)
                self.dynamic.pop(p, None)
            if p < len(ids):
                ix = _index(states[p])
                ix.fill()
                if p < len(ixs):
                    ixs[p] = ix
                else:
                    ixs.append(ix)
                for m in ix.models:
                    self.by_model.setdefault(m, {})[p] = None
                self._set(p, ix)
        del ixs[len(ids):]
        self.ids, self.ixs = ids, ixs    # new lists: a reader holding the old ones keeps consistent ones

    def lookup(self, states: list[dict], model: str, listed: int | None):
        """([(position, index)] of the holders of `model`; [(position, index)] of the other fetching
        nodes, or None when there are more than `listed` of them (then rank() them); the ids synced)."""
        with self.lock:
            self.sync(states)
            ixs = self.ixs
            where = self.by_model.get(model, {})
            hold = [(p, ixs[p]) for p in sorted(where)]
            fetch = None
            if listed is None or len(self.fetchers) - len(where) <= listed:
                fetch = [(p, ixs[p]) for p in sorted(self.fetchers) if p not in where]
            return hold, fetch, self.ids

    def rank(self, views: list[NodeView], states: list[dict], ids: list[int], hold: list, peer_size, repo_size,
             prefer: str | None) -> tuple:
        """The fetching nodes in placement's order, ignoring staleness: by their best fetch time
        (q + size/b(fetch) + size/b(ssd_device), the same float operations as node_estimates), then
        not `prefer`, then peer before repo, then name: (positions, seconds, indexes, dynamic
        [(position, index)] whose SSD rate borrows the median, so the arrays cannot rank them)."""
        names = [v.name for v in views]
        with self.lock:
            if self.ids is not ids:
                self.sync(states)
            if names != self.names:
                self.names = names
                self.name_rank = np.empty(len(names), dtype=np.int64)
                self.name_rank[sorted(range(len(names)), key=names.__getitem__)] = np.arange(len(names))
                self.name_pos = {n: p for p, n in enumerate(names)}
            q, peer, repo, ssd = self.arrays
            n = len(self.ids)
            inf = np.full(n, np.inf)
            with np.errstate(invalid="ignore", divide="ignore"):
                peer_s = np.fmin(inf, q + peer_size / peer + peer_size / ssd) if peer_size is not None else inf
                repo_s = np.fmin(inf, q + repo_size / repo + repo_size / ssd) if repo_size is not None else inf
            best = np.fmin(peer_s, repo_s)
            path = np.where(peer_s <= repo_s, PATH_RANK["peer"], PATH_RANK["repo"])
            held = [p for p, _ in hold]
            best[held] = np.inf
            not_preferred = np.ones(n, dtype=np.int8)
            if prefer in self.name_pos:
                not_preferred[self.name_pos[prefer]] = 0
            order = np.lexsort((self.name_rank, path, not_preferred, best))
            held_set = set(held)
            dynamic = [(p, self.ixs[p]) for p in self.dynamic if p not in held_set]
            return order, best, self.ixs, dynamic


_EMPTY: dict = {}      # the state of a view without one (never changed)
_HOLDERS = _Holders()


def holding(model: str, views: list[NodeView]) -> set[str]:
    """The names of the nodes whose state lists `model` (any tier, any state): what a migration
    hook needs to look at, found through the same index as place()."""
    views = views if isinstance(views, list) else list(views)
    states = [v.state or _EMPTY for v in views]
    if len(views) <= SMALL:
        return {v.name for v, st in zip(views, states) if model in _index(st).models}
    hold, _, _ = _HOLDERS.lookup(states, model, 0)
    return {views[p].name for p, _ in hold}


def place(model: str, views: list[NodeView], now: float, *, stale_after_s: float = 10.0,
          exclude: set[str] | frozenset[str] = frozenset(), migration: Callable | None = None,
          prefer: str | None = None, repository: dict[str, int] | None = None,
          max_candidates: int | None = MAX_CANDIDATES) -> Decision:
    """The best option per node for `model` over `views` (alive, not excluded), in the order to
    try them, at most max_candidates of them (None: all). `now` is on the same clock as
    NodeView.fetched_at. migration(model, view) -> Estimate | None adds the option of moving a
    running request away (section 9).

    Only the nodes that hold `model`, the nodes that can fetch it (fetch_bandwidth) and, with a hook, every live node for the hook are visited: a node that neither
    holds nor can fetch the model has no option of its own."""
    views = views if isinstance(views, list) else list(views)
    states = [v.state or _EMPTY for v in views]
    listed = None if max_candidates is None else LIST_FETCHERS
    if len(views) <= SMALL:    # a direct scan; the shared index keeps the big list's positions
        ixs = [_index(st) for st in states]
        hold = [(p, ix) for p, ix in enumerate(ixs) if model in ix.models]
        fetch = [(p, ix) for p, ix in enumerate(ixs) if ix.fetches and model not in ix.models]
        ids = None
    else:
        hold, fetch, ids = _HOLDERS.lookup(states, model, listed)
    fallbacks = _Fallbacks(v for v in views if v.status in CANDIDATE_STATUS and v.name not in exclude)
    holders: dict[str, int] = {}    # node -> size of its SSD copy (fresh views only): the peers' sources
    best: dict[str, tuple] = {}     # node -> (order key, (view, None | a path to estimate | Estimate))

    def offer(key: tuple, payload) -> None:
        old = best.get(key[4])
        if old is None or key < old[0]:
            best[key[4]] = (key, payload)

    repo = repository or {}
    for p, ix in hold:   # inlined for speed: this loop runs once per holder
        v = views[p]
        name = v.name
        if v.status not in CANDIDATE_STATUS or name in exclude:
            continue
        stale = now - v.fetched_at > stale_after_s
        cost, ssd_size = ix.holder(model, fallbacks)
        if ssd_size is not None and not stale:
            holders[name] = ssd_size
        if cost is not None:
            key = (stale, cost[1], name != prefer, PATH_RANK[cost[0]], name)
            old = best.get(name)
            if old is None or key < old[0]:
                best[name] = (key, (v, None))
    # a fetching node's source: the smallest copy not its own (needed only when some node can fetch)
    by_size = heapq.nsmallest(2, holders, key=lambda n: (holders[n], n)) if fetch is None or fetch else []
    repo_size = repo[model] if model in repo else None
    args = (model, holders, by_size, repo_size, now, stale_after_s, exclude, prefer, fallbacks, offer)
    if fetch is not None:
        for p, ix in fetch:
            _offer_fetch(views[p], ix, *args)
    else:   # many fetching nodes: walk them fastest first, until max_candidates fresh ones are offered
        order, seconds, ixs, dynamic = _HOLDERS.rank(views, states, ids, hold,
                                                      holders[by_size[0]] if by_size else None, repo_size, prefer)
        for p, ix in dynamic:
            _offer_fetch(views[p], ix, *args)
        fresh = 0
        for p in order.tolist():
            if seconds[p] == math.inf:
                break
            v = views[p]
            if v.status not in CANDIDATE_STATUS or v.name in exclude:
                continue
            _offer_fetch(v, ixs[p], *args)
            if now - v.fetched_at <= stale_after_s:
                fresh += 1
                if fresh == max_candidates:
                    break    # every fetch option not offered comes after these in placement's order
    if migration is not None:
        for v in views:
            if v.status not in CANDIDATE_STATUS or v.name in exclude:
                continue
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
        elif isinstance(e, str):   # a fetch: the estimate of that path, from the same formula
            e = next(x for x in node_estimates(model, v, holders, fallbacks, repo) if x.path == e)
        if key[0]:
            e.detail = dict(e.detail, stale=True, age_s=now - v.fetched_at)
        candidates.append(e)
    winner = candidates[0] if candidates else None
    runner_up = candidates[1] if len(candidates) > 1 else None
    return Decision(winner=winner, candidates=candidates, runner_up=runner_up)


def _offer_fetch(v, ix, model, holders, by_size, repo_size, now, stale_after_s, exclude, prefer, fallbacks, offer):
    """Offer the peer and repository options of a fetching node that does not hold `model`, with
    node_estimates' formulas (q + size/b(fetch) + size/b(ssd_device)); their details come later."""
    if v.status not in CANDIDATE_STATUS or v.name in exclude:
        return
    stale = now - v.fetched_at > stale_after_s
    q, peer_bw, repo_bw, ssd_bw = ix.fetch_params(fallbacks)
    if peer_bw is not None:
        source = next((n for n in by_size if n != v.name), None)
        if source is not None:
            size = holders[source]
            offer((stale, q + size / peer_bw + size / ssd_bw, v.name != prefer, PATH_RANK["peer"], v.name),
                  (v, "peer"))
    if repo_size is not None and repo_bw is not None:
        offer((stale, q + repo_size / repo_bw + repo_size / ssd_bw, v.name != prefer, PATH_RANK["repo"], v.name),
              (v, "repo"))
