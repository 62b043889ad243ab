"""What the TUI knows: the latest watch update, folded into a view the widgets read.

A `watch` update is {"seq", "time", "dropped", "snapshot": {"status", "models", "ps",
"requests", "nodes", "loader"}, "events": [...]}. The snapshot's counters are
cumulative; the moving graphs come from their differences between two updates
(bytes over the updates' time apart). Everything here is plain data and pure
functions of the updates fed in, so a test (or a snapshot) that feeds fixed
updates sees a fixed screen.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

HISTORY = 120   # points per graph: a minute at the default 0.5 s interval
TIERS = ("device", "dram", "ssd")


def disk_bytes(loader: dict) -> tuple[int, int]:
    """(read with O_DIRECT, read buffered through the page cache) of the loader's counters."""
    return int(loader.get("bytes_direct") or 0), int(loader.get("bytes_cached") or 0)


def h2d_bytes(loader: dict, device: str | None) -> int:
    """Bytes the loader moved onto the device: the CUDA copies on a GPU; on a CPU device, whose
    "device" memory is host memory, the loader's copies into it."""
    if loader.get("bytes_h2d") or (device or "").startswith("cuda"):
        return int(loader.get("bytes_h2d") or 0)
    return int(loader.get("bytes_copied") or 0)


@dataclass
class NodeView:
    """One node as the panels show it: tiers, models, instances, requests."""
    name: str
    local: bool
    device: str = "?"
    tiers: dict = field(default_factory=dict)
    models: list = field(default_factory=list)
    instances: list = field(default_factory=list)
    requests: list = field(default_factory=list)


@dataclass
class Load:
    """A load in flight, from load_started / load_progress events."""
    name: str
    tier: str | None = None
    done: int = 0
    total: int = 0
    started: float = 0.0


class View:
    def __init__(self, history: int = HISTORY):
        self.history = history
        self.seq: int | None = None
        self.time: float | None = None
        self.dropped = 0
        self.snapshot: dict[str, Any] = {}
        self.updates = 0
        self.h2d = collections.deque([0.0] * history, maxlen=history)          # bytes/s per interval
        self.disk_direct = collections.deque([0.0] * history, maxlen=history)
        self.disk_cached = collections.deque([0.0] * history, maxlen=history)
        self.events: collections.deque[dict] = collections.deque(maxlen=200)
        self.loads: dict[str, Load] = {}
        self.token_rates: dict[str, float] = {}    # request id -> tokens/s over the last interval
        self._tokens: dict[str, tuple[float, int]] = {}
        self._prev: tuple[float, int, int, int] | None = None   # (time, h2d, direct, cached)
        self.selected: str | None = None   # the node the panels show; None: the local one

    # --- feeding -----------------------------------------------------------------------------------
    def apply(self, update: dict) -> None:
        snap = update.get("snapshot")
        if isinstance(snap, dict):   # a part left out or None (the daemon failed to read it) keeps its last value
            self.snapshot.update({k: v for k, v in snap.items() if v is not None})
        self.seq = update.get("seq", self.seq)
        self.time = float(update.get("time") or self.time or 0.0)
        self.dropped = int(update.get("dropped") or 0)
        self.updates += 1
        for ev in update.get("events") or []:
            if isinstance(ev, dict):
                self._event(ev)
        self._rates()

    def _event(self, ev: dict) -> None:
        self.events.append(ev)
        kind, name = ev.get("kind"), ev.get("name") or ev.get("model")
        if name is None:
            return
        if kind == "load_started":
            self.loads[name] = Load(name, ev.get("tier") or ev.get("from"), 0, int(ev.get("total") or 0),
                                    float(ev.get("time") or 0))
        elif kind == "load_progress":
            load = self.loads.setdefault(name, Load(name, ev.get("tier") or ev.get("from")))
            load.done = int(ev.get("done") or load.done)
            load.total = int(ev.get("total") or load.total)
        elif kind in ("load_finished", "load_failed"):
            self.loads.pop(name, None)

    def _rates(self) -> None:
        loader = self.loader
        now = self.time or 0.0
        cur = (now, h2d_bytes(loader, self.device), *disk_bytes(loader))
        prev, self._prev = self._prev, cur
        if prev is not None and now > prev[0]:
            dt = now - prev[0]
            # A counter that went down is a restarted daemon: that interval shows nothing.
            rate = [max(0, c - p) / dt if c >= p else 0.0 for c, p in zip(cur[1:], prev[1:])]
            self.h2d.append(rate[0])
            self.disk_direct.append(rate[1])
            self.disk_cached.append(rate[2])
        seen = {}
        for r in self.snapshot.get("requests") or []:
            rid, out = r.get("id"), int(r.get("tokens_out") or 0)
            if rid is None:
                continue
            seen[rid] = (now, out)
            last = self._tokens.get(rid)
            if last is not None and now > last[0]:
                self.token_rates[rid] = max(0, out - last[1]) / (now - last[0])
            elif r.get("age_s"):
                self.token_rates[rid] = out / float(r["age_s"])
        self._tokens = seen
        self.token_rates = {k: v for k, v in self.token_rates.items() if k in seen}

    # --- reading -----------------------------------------------------------------------------------
    @property
    def status(self) -> dict:
        return self.snapshot.get("status") or {}

    @property
    def loader(self) -> dict:
        return self.snapshot.get("loader") or self.status.get("loader") or {}

    @property
    def device(self) -> str:
        return str(self.status.get("device") or "?")

    @property
    def nodes(self) -> list[dict]:
        return list(self.snapshot.get("nodes") or [])

    @property
    def local_name(self) -> str | None:
        """This node's name: the cluster's self entry; without a cluster, what its rows say."""
        me = next((n for n in self.nodes if n.get("self")), None)
        if me:
            return me.get("name")
        if self.nodes:
            return None
        for key in ("requests", "models", "ps"):
            row = next((r for r in self.snapshot.get(key) or [] if isinstance(r, dict) and r.get("node")), None)
            if row:
                return str(row["node"])
        return None

    def node_names(self) -> list[str]:
        return [str(n.get("name")) for n in self.nodes if n.get("name") is not None]

    def next_node(self) -> str | None:
        """Selects the next cluster node (wrapping around to the local one)."""
        names = self.node_names()
        if len(names) < 2:
            self.selected = None
            return self.local_name
        current = self.selected or self.local_name
        i = names.index(current) if current in names else -1
        nxt = names[(i + 1) % len(names)]
        self.selected = None if nxt == self.local_name else nxt
        return nxt

    def _rows(self, key: str, node: str | None) -> list[dict]:
        """A cluster watch's rows carry their "node": those of `node` (None: the local one's, or all
        rows of a watch without a cluster)."""
        rows = [r for r in self.snapshot.get(key) or [] if isinstance(r, dict)]
        name = node or self.local_name
        if name is None or not any("node" in r for r in rows):
            return rows
        return [r for r in rows if r.get("node", name) == name]

    def node_view(self) -> NodeView:
        """The selected node: the local one from the snapshot; another from the cluster rows of
        the snapshot and the tiers of its gossiped state."""
        if self.selected is not None:
            node = next((n for n in self.nodes if n.get("name") == self.selected), None)
            if node is not None and not node.get("self"):
                state = node.get("state") or {}
                name = self.selected
                models = self._rows("models", name) or list(state.get("models") or [])
                return NodeView(name, False, str(state.get("device") or "?"), state.get("tiers") or {}, models,
                                self._rows("ps", name) or list(state.get("instances") or []),
                                self._rows("requests", name) or list(state.get("requests") or []))
            self.selected = None
        status = self.status
        return NodeView(self.local_name or "local", True, self.device, status.get("tiers") or {},
                        self._rows("models", None), self._rows("ps", None) or list(status.get("instances") or []),
                        self._rows("requests", None))

    def rate_now(self) -> dict[str, float]:
        return {"h2d": self.h2d[-1], "disk_direct": self.disk_direct[-1], "disk_cached": self.disk_cached[-1]}


def fastest_tier(model: dict) -> str:
    tiers = model.get("tiers") or []
    return next((t for t in TIERS if t in tiers), "-")
