"""Simulated servers: GPUs, a DRAM and an SSD tier with capacities, one loader, and the
locality state each reports (the dict shape of sllmd.cluster.locality.local_state).

- Tiers: DRAM and SSD are LRU caches of checkpoints (bytes per model), like the daemon's tiers:
  a model loaded from SSD stays in DRAM, one fetched from a peer or the repository stays on
  SSD; the least recently used copy not in use is evicted to make room.
- GPUs: an instance of a model holds `gpus` GPUs while it waits for its load, loads and serves.
  When a new instance needs GPUs, idle instances are evicted, least recently used first; if
  still too few are free, it waits (FIFO) for running requests to finish.
- The loader: one load at a time per server (the paper's "sequential model loading per
  server"), each taking the path's time: size/b(dram_device), size/b(ssd_device), or
  size/b(peer_ssd | repo_ssd) + size/b(ssd_device) — the bandwidths the state reports.
- An instance runs one request at a time; the others queue (queue_depth per instance).

What the state says is the node's own estimate, as a real node would make it: remaining times
of running requests assume the mean output length (the node cannot know a request's), service
times are sllmd.cluster.locality.ServiceTimes EWMAs fed by finished requests.
"""
from __future__ import annotations

import collections
import dataclasses

from sllmd.cluster.locality import ServiceTimes
from sllmd.cluster.sim.config import ModelSpec, ServerSpec


@dataclasses.dataclass(eq=False)
class Run:
    """A request on a server: the request, and where its decoding stands."""
    req: object                   # workload.Request
    record: dict                  # the request's result row (engine.py fills it)
    tokens_done: int = 0          # output tokens produced before this run (a migrated request's)
    started: float | None = None  # when it began on the instance (prefill start)
    prefill_s: float = 0.0
    event: int = 0                # the sequence number of its pending finish/handoff event (0: none)
    tpot_s: float = 0.0           # its model's time per output token where it runs
    source: tuple | None = None   # a migration's destination run: (the victim's run, its server)
    migrating_to: tuple | None = None   # a victim's: (the destination run, server, instance)


@dataclasses.dataclass(eq=False)
class Instance:
    model: ModelSpec
    state: str                    # waiting (for GPUs) | loading | loaded
    path: str                     # how it was (or will be) loaded
    ready_at: float = float("inf")
    running: Run | None = None
    queue: collections.deque = dataclasses.field(default_factory=collections.deque)
    last_used: float = 0.0
    releasing: bool = False       # its GPUs are promised to another model (migration or preemption)

    @property
    def idle(self) -> bool:
        return self.state == "loaded" and self.running is None and not self.queue and not self.releasing


class LruTier:
    """Checkpoints by name with a byte capacity; insert evicts the least recently used ones not protected."""

    def __init__(self, capacity: float):
        self.capacity = capacity
        self.items: collections.OrderedDict[str, float] = collections.OrderedDict()
        self.used = 0.0

    def __contains__(self, name: str) -> bool:
        return name in self.items

    def touch(self, name: str) -> None:
        if name in self.items:
            self.items.move_to_end(name)

    def insert(self, name: str, nbytes: float, protect=frozenset()) -> bool:
        if name in self.items:
            self.items.move_to_end(name)
            return True
        if nbytes > self.capacity:
            return False
        for victim in [n for n in self.items if n not in protect]:
            if self.used + nbytes <= self.capacity:
                break
            self.used -= self.items.pop(victim)
        if self.used + nbytes > self.capacity:
            return False
        self.items[name] = nbytes
        self.used += nbytes
        return True


class Server:
    def __init__(self, name: str, spec: ServerSpec, mean_out: float):
        self.name, self.spec, self.mean_out = name, spec, mean_out
        self.bw = dict(spec.bandwidth)
        self.dram, self.ssd = LruTier(spec.dram_bytes), LruTier(spec.ssd_bytes)
        self.instances: dict[str, Instance] = {}
        self.waiting: collections.deque[Instance] = collections.deque()
        self.loader_free_at = 0.0
        self.times = ServiceTimes()
        self.version = 0
        self.state: dict | None = None
        self.state_at = -1.0

    # --- accounting -------------------------------------------------------------------------
    def changed(self) -> None:
        self.version += 1
        self.state = None

    def free_gpus(self) -> int:
        return self.spec.gpus - sum(i.model.gpus for i in self.instances.values() if i.state != "waiting")

    def busy(self) -> bool:
        """Whether its state changes with time alone (a load or a request in flight)."""
        return any(i.state != "loaded" or i.running is not None for i in self.instances.values())

    def load_seconds(self, path: str, nbytes: float) -> float:
        """The loader's time for one load over `path` (placement's formulas, this server's bandwidths)."""
        if path == "dram":
            return nbytes / self.bw["dram_device"]
        if path == "ssd":
            return nbytes / self.bw["ssd_device"]
        if path in ("peer", "repo"):
            return nbytes / self.bw[f"{path}_ssd"] + nbytes / self.bw["ssd_device"]
        raise ValueError(f"no load path {path!r}")

    def local_path(self, model: str) -> str | None:
        return "dram" if model in self.dram else "ssd" if model in self.ssd else None

    def service_s(self, m: ModelSpec) -> float:
        return self.times.service_s(m.name) or (m.prefill_s + m.tpot_s * self.mean_out)

    # --- estimates (the node's own, as it would report them) ----------------------------------
    def remaining_s(self, inst: Instance, now: float) -> float:
        """When `inst` would be done with what it has (running and queued), by the node's estimate."""
        m = inst.model
        if inst.state == "loaded":
            start = now
        elif inst.state == "loading":
            start = inst.ready_at
        else:
            start = now + self.gpu_wait_s(now) + self.load_seconds(inst.path, m.bytes)
        left = 0.0
        run = inst.running
        if run is not None:
            elapsed = now - run.started if run.started is not None else 0.0
            produced = run.tokens_done + max(0.0, elapsed - run.prefill_s) / m.tpot_s
            left = max(self.mean_out - produced, 1.0) * m.tpot_s + max(run.prefill_s - elapsed, 0.0)
        return max(start - now, 0.0) + left + len(inst.queue) * self.service_s(m)

    def gpu_wait_s(self, now: float) -> float:
        """How long a new instance would wait for one GPU: 0 when one is free or idle, else until
        the busy instances ahead free enough of them (those already waiting go first)."""
        spare = self.free_gpus() + sum(i.model.gpus for i in self.instances.values() if i.idle)
        need = sum(i.model.gpus for i in self.waiting) + 1
        if spare >= need:
            return 0.0
        ends = sorted((self.remaining_s(i, now), i.model.gpus) for i in self.instances.values()
                      if i.state != "waiting" and not i.idle)
        for t, gpus in ends:
            spare += gpus
            if spare >= need:
                return t
        return ends[-1][0] if ends else 0.0

    def queue_delay_s(self, now: float) -> float:
        return max(self.loader_free_at - now, 0.0) + self.gpu_wait_s(now)

    # --- the locality state -----------------------------------------------------------------
    def take_state(self, now: float) -> dict:
        """A new state dict (never changed afterwards), in the shape of locality.local_state."""
        models, instances, requests = [], [], []
        names = list(dict.fromkeys([*self.ssd.items, *self.dram.items, *self.instances]))
        for name in names:
            inst = self.instances.get(name)
            tiers = [t for t, tier in (("ssd", self.ssd), ("dram", self.dram)) if name in tier]
            size = (self.ssd.items.get(name) or self.dram.items.get(name) or (inst.model.bytes if inst else 0))
            if inst is not None:
                tiers.append("device")
            models.append({"name": name, "state": "loaded" if inst else "in_dram" if "dram" in tiers else "on_ssd",
                           "tiers": tiers, "checkpoint_bytes": int(size),
                           "ssd_bytes": int(size) if "ssd" in tiers else 0,
                           "dram_bytes": int(size) if "dram" in tiers else 0,
                           "device_bytes": int(size) if inst else 0, "pinned": False, "error": None})
            if inst is None:
                continue
            m = inst.model
            delay = self.remaining_s(inst, now) if not inst.idle else 0.0
            instances.append({"name": name, "state": "evicting" if inst.releasing else "loaded",
                              "active_requests": int(inst.running is not None),
                              "queued": len(inst.queue), "queue_depth": self.spec.queue_depth,
                              "service_s": self.service_s(m), "queue_delay_s": delay,
                              "expires_at": None, "load_tier": inst.path, "load_s": None})
            if inst.running is not None and inst.running.started is not None and not inst.releasing:
                run = inst.running
                elapsed = now - run.started
                requests.append({"id": run.req.id, "model": name, "state": "running",
                                 "tokens_in": run.req.t_in, "tokens_out": run.tokens_done,
                                 "running_s": max(elapsed - run.prefill_s, 0.0), "age_s": elapsed,
                                 "tpot_s": m.tpot_s})
        used = {"ssd": self.ssd.used, "dram": self.dram.used,
                "device": (self.spec.gpus - self.free_gpus()) * self.spec.gpu_bytes}
        caps = {"ssd": self.spec.ssd_bytes, "dram": self.spec.dram_bytes,
                "device": self.spec.gpus * self.spec.gpu_bytes}
        self.state = {
            "node": self.name, "version": self.version, "device": f"{self.spec.gpus}xgpu", "taken_at": now,
            "models": models,
            "tiers": {t: {"used_bytes": int(used[t]), "capacity_bytes": int(caps[t]),
                          "free_bytes": int(max(caps[t] - used[t], 0))} for t in caps},
            "instances": instances,
            "loads_in_flight": sum(1 for i in self.instances.values() if i.state != "loaded"),
            "queue_delay_s": self.queue_delay_s(now),
            "bandwidths": dict(self.bw),
            "requests": requests,
            "gpus": {"total": self.spec.gpus, "free": self.free_gpus(),
                     "idle": sum(i.model.gpus for i in self.instances.values() if i.idle)},
        }
        self.state_at = now
        return self.state
