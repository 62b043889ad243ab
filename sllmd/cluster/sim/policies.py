"""Placement policies, one interface: decide(request, now, views) -> Choice | None.

Every policy prices a node's option with sllmd.cluster.placement.place, the function the
coordinator calls, on NodeViews in the shape of sllmd.cluster.locality.local_state; they differ
in which nodes they offer it and in the migration hook they pass:

    random       a random alive node (a warm idle instance anywhere first)
    round-robin  the next node in turn (a warm idle instance anywhere first)
    load-only    the least loaded node (fewest busy GPUs, then queue delay), locality ignored:
                 the paper's "Serverless" baseline (a warm idle instance anywhere first)
    locality     place() over every node, no hook: locality, no migration, no preemption
    shepherd     place() with a hook that preempts: a node holding the model locally whose GPUs
                 are busy may kill a running request (it restarts from scratch elsewhere) and
                 load the model there (Shepherd*-like, as in the paper's comparison)
    ours         place() with the migration hook: the running request moves live to the node
                 place() picks for its model; cost a*(t_in + t_out) + b0 (DESIGN.md section 8,
                 t_out = d/t), plus that node's time to have its model ready, plus the local load
    oracle       no decisions: the warm-start bound (engine.py), every request's prefill only
"""
from __future__ import annotations

import dataclasses
import random

from sllmd.cluster import placement
from sllmd.cluster.locality import NodeView
from sllmd.cluster.placement import Estimate, place
from sllmd.cluster.sim.config import ModelSpec


@dataclasses.dataclass
class Choice:
    node: str
    path: str                 # instance | dram | ssd | peer | repo | migration
    estimate: Estimate        # what place() said (seconds, details)
    runner_up: Estimate | None = None


class Policy:
    name = "policy"

    def __init__(self, models: dict[str, ModelSpec], *, stale_after_s: float, seed: int = 1):
        self.models = models
        self.repository = {name: int(m.bytes) for name, m in models.items()}
        self.stale_after_s = stale_after_s
        self.rng = random.Random(f"policy:{seed}")

    def place(self, model: str, views: list[NodeView], now: float, **kw):
        """placement.place with this run's repository and staleness: the one code path."""
        return place(model, views, now, stale_after_s=self.stale_after_s, repository=self.repository, **kw)

    def decide(self, req, now: float, views: list[NodeView]) -> Choice | None:
        raise NotImplementedError


def _choice(decision) -> Choice | None:
    w = decision.winner
    return None if w is None else Choice(w.node, w.path, w, decision.runner_up)


class Locality(Policy):
    """place() over every node, with this policy's hook (none here)."""
    name = "locality"

    def hook(self, model: str, views: list[NodeView], now: float):
        return None

    def decide(self, req, now, views):
        return _choice(self.place(req.model, views, now, migration=self.hook(req.model, views, now)))


def _local_copy(state: dict, model: str):
    """(info, gpus the node could give now) when `state`'s node holds `model` in DRAM or on SSD
    without an instance of it; else None."""
    info = placement._models(state).get(model)
    if info is None or info.get("error"):
        return None
    tiers = info.get("tiers") or ()
    if "device" in tiers or not ("dram" in tiers or "ssd" in tiers):
        return None
    gpus = state.get("gpus") or {}
    return info, int(gpus.get("free", 0)) + int(gpus.get("idle", 0))


def _local_load_s(state: dict, info: dict) -> tuple[str, float]:
    bws = state.get("bandwidths") or {}
    path = "dram" if "dram" in (info.get("tiers") or ()) else "ssd"
    bw = bws.get("dram_device" if path == "dram" else "ssd_device") or placement.DEFAULT_BANDWIDTHS["ssd_device"]
    return path, placement._size(info) / float(bw)


class _Victims(Locality):
    """Shared by shepherd and ours: the running requests a node could give up for `model`."""

    def victims(self, state: dict, model: str):
        """(request, its model's spec, its instance) for each running request of another model whose
        instance would free enough GPUs for `model`, on a node holding `model` locally."""
        local = _local_copy(state, model)
        if local is None:
            return None, []
        info, spare = local
        need = self.models[model].gpus
        if spare >= need:
            return info, []      # no need: the plain load applies
        instances = {i["name"]: i for i in state.get("instances") or ()}
        out = []
        for r in state.get("requests") or ():
            spec = self.models.get(r["model"])
            inst = instances.get(r["model"])
            if spec is None or inst is None or r["model"] == model or inst.get("queued"):
                continue
            if spare + spec.gpus >= need:
                out.append((r, spec))
        return info, out


class Shepherd(_Victims):
    name = "shepherd"

    def hook(self, model, views, now):
        local = placement.holding(model, views)   # only these nodes can load it without fetching

        def preempt(m: str, view: NodeView) -> Estimate | None:
            if view.name not in local:
                return None
            state = view.state or {}
            info, victims = self.victims(state, m)
            if not victims:
                return None
            r, spec = min(victims, key=lambda rv: (rv[0]["tokens_out"], rv[0]["id"]))   # least work lost
            path, load_s = _local_load_s(state, info)
            return Estimate(view.name, "migration", load_s,
                            {"kind": "preempt", "victim": r["id"], "victim_model": r["model"], "load_path": path})
        return preempt


class Ours(_Victims):
    """Migrates only to a destination with spare capacity now (an idle instance of the victim's
    model, or free or idle GPUs for it): moving a request onto a busy node only moves the wait,
    and the extra load there delays that node's own requests."""
    name = "ours"

    def spare(self, dest: Estimate, views: list[NodeView], victim_model: str) -> bool:
        if dest.path == "instance":
            return dest.seconds == 0.0
        if dest.path == "migration":
            return False
        state = next((v.state for v in views if v.name == dest.node), None) or {}
        g = state.get("gpus") or {}
        return int(g.get("free", 0)) + int(g.get("idle", 0)) >= self.models[victim_model].gpus

    def hook(self, model, views, now):
        dest_memo: dict[tuple[str, str], Estimate | None] = {}

        def destination(victim_model: str, source: str) -> Estimate | None:
            key = (victim_model, source)
            if key not in dest_memo:
                d = self.place(victim_model, views, now, exclude={source}, max_candidates=1)
                w = d.winner
                dest_memo[key] = w if w is not None and self.spare(w, views, victim_model) else None
            return dest_memo[key]

        local = placement.holding(model, views)   # only these nodes can load it without fetching

        def migrate(m: str, view: NodeView) -> Estimate | None:
            if view.name not in local:
                return None
            state = view.state or {}
            info, victims = self.victims(state, m)
            if not victims:
                return None
            path, load_s = _local_load_s(state, info)
            best = None
            for r, spec in victims:
                dest = destination(r["model"], view.name)
                if dest is None:
                    continue
                t_out = r["running_s"] / spec.tpot_s             # d / t: tokens so far, estimated
                mig_s = spec.migration_a * (r["tokens_in"] + t_out) + spec.migration_b0
                seconds = dest.seconds + mig_s + load_s
                if best is None or seconds < best.seconds:
                    best = Estimate(view.name, "migration", seconds,
                                    {"kind": "migrate", "victim": r["id"], "victim_model": r["model"],
                                     "to": dest.node, "to_path": dest.path, "to_s": dest.seconds,
                                     "migration_s": mig_s, "load_path": path, "load_s": load_s})
            return best
        return migrate


class _Baseline(Policy):
    """A warm idle instance anywhere first (as any serverless platform routes); else a node by
    this policy's rule, priced by place() on that node alone (the next one if it has no option)."""

    def order(self, views: list[NodeView]) -> list[NodeView]:
        raise NotImplementedError

    def decide(self, req, now, views):
        d = self.place(req.model, views, now, max_candidates=1)
        if d.winner is not None and d.winner.path == "instance" and d.winner.seconds == 0.0:
            return _choice(d)
        for v in self.order([v for v in views if v.status in placement.CANDIDATE_STATUS]):
            c = _choice(self.place(req.model, [v], now))
            if c is not None:
                return c
        return None


class RandomPolicy(_Baseline):
    name = "random"

    def order(self, views):
        views = list(views)
        self.rng.shuffle(views)
        return views


class RoundRobin(_Baseline):
    name = "round-robin"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.next = 0

    def order(self, views):
        if not views:
            return []
        k = self.next % len(views)
        self.next += 1
        return views[k:] + views[:k]


class LoadOnly(_Baseline):
    name = "load-only"

    @staticmethod
    def load(v: NodeView) -> tuple:
        s = v.state or {}
        g = s.get("gpus") or {}
        busy = int(g.get("total", 0)) - int(g.get("free", 0)) - int(g.get("idle", 0))
        return busy, float(s.get("queue_delay_s") or 0.0), v.name

    def order(self, views):
        return sorted(views, key=self.load)


POLICIES = {p.name: p for p in (RandomPolicy, RoundRobin, LoadOnly, Locality, Shepherd, Ours)}


def make(name: str, models: dict[str, ModelSpec], *, stale_after_s: float, seed: int) -> Policy:
    return POLICIES[name](models, stale_after_s=stale_after_s, seed=seed)
