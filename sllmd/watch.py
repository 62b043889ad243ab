"""The `watch` stream: a snapshot of the node and the events since the last one, at a bounded rate.

    Watch (own stream thread) ──every interval_s──► update frame ──► server outbox ──► client
        │  snapshot: status/models/ps from sllmd.snapshot (shared, retaken only when stale),
        │            requests and loader counters read fresh, nodes from the cluster
        │  events:   this watcher's sllmd.events.Subscription (bounded, coalescing)
        └◄── ack(seq) from the client (via the I/O thread): at most WINDOW updates unacknowledged

An update (the `data` of an `update` reply):

    {"seq": 1, 2, ...; "time": unix seconds; "dropped": events coalesced or dropped since the last update,
     "snapshot": {"status": as `status` (no "daemon" part), "models": as `models`, "ps": as `ps`,
                  "requests": as `requests`, "nodes": as `nodes` with a cluster (else []),
                  "loader": sllmd.pool.counters() now (cumulative: a UI takes differences)},
     "events": [{"kind", "time", ...}, ...]}

Every event carries the "node" it happened on. With `cluster`, models/ps/requests are every
node's (each row with its "node"), as `--all` gives them, and the events are every node's too:
the watch relays each live peer's own stream (peer_watch, one per peer, opened and closed with
this watch; a peer's dropped events count in this watch's `dropped`; its `node` events are left
out, this node reports membership as it sees it).
A client that stops reading stops acknowledging: the daemon then sends nothing more for it
but heartbeats, and its events wait (bounded) in its subscription. Nothing here runs on the
I/O thread, and nothing a watcher does holds a lock a request needs for longer than a read.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any, Callable

from .errors import CancelledError
from .events import EventBus
from .protocol.codec import pack
from .snapshot import Snapshots, map_header

log = logging.getLogger(__name__)

WINDOW = 4          # updates sent but not yet acknowledged, at most
POLL_S = 0.1        # how often a waiting watch looks at its cancel flag
PEERS_S = 2.0       # how often a cluster watch looks for peers to relay (joined, or back)

_UPDATE_HEAD = b"\x83" + pack("type") + pack("update") + pack("id")
_DATA_KEY = pack("data")


def _loader_counters() -> dict:
    try:
        from . import pool
        return pool.counters()
    except Exception:   # noqa: BLE001 - a node without the native loader has no counters
        return {}


class Watch:
    """One watcher: call run() on its stream thread; ack() from any thread."""

    def __init__(self, node: Any, bus: EventBus, snapshots: Snapshots, *, request_id: int, interval_s: float,
                 send: Callable[[bytes], None], cancelled: threading.Event, cluster: Any = None,
                 max_events: int = 1000):
        self.node, self.bus, self.snapshots = node, bus, snapshots
        self.request_id = request_id
        self.interval_s = interval_s
        self.cluster = cluster
        self._send = send
        self._cancelled = cancelled
        self._sub = bus.subscribe(max_events)
        self._seq = 0
        self._acked = 0
        self._name = getattr(getattr(node, "config", None), "node_name", None) or socket.gethostname()
        self._relays: dict[str, threading.Thread] = {}
        self._stopped = threading.Event()

    def ack(self, seq: int) -> None:
        if seq > self._acked:
            self._acked = min(seq, self._seq)
            self._sub.changed.set()

    def run(self) -> None:
        """Sends updates until cancelled (raises CancelledError then, as a cancelled request does)."""
        try:
            next_at = time.monotonic()
            peers_at = next_at
            while True:
                if self._cancelled.is_set():
                    raise CancelledError("watch cancelled")
                now = time.monotonic()
                if self.cluster is not None and now >= peers_at:
                    self._relay_peers()
                    peers_at = now + PEERS_S
                if self._seq - self._acked >= WINDOW:
                    self._wait(POLL_S)      # the client has not taken what it was sent
                    continue
                if now < next_at:
                    self._wait(min(POLL_S, next_at - now))
                    continue
                self._seq += 1
                self._send(self.frame(self._seq))
                next_at = max(next_at + self.interval_s, now)   # at most one per interval, no catching up
        finally:
            self._stopped.set()
            self.bus.unsubscribe(self._sub)

    def _wait(self, timeout: float) -> None:
        self._sub.changed.wait(timeout)
        self._sub.changed.clear()

    # --- a cluster's other nodes --------------------------------------------------------------------
    def _relay_peers(self) -> None:
        try:
            peers = self.cluster.watch_peers()
        except Exception:
            log.debug("listing the peers to watch failed", exc_info=True)
            return
        for name in peers:
            relay = self._relays.get(name)
            if relay is None or not relay.is_alive():
                relay = self._relays[name] = threading.Thread(target=self._relay, args=(name,), daemon=True,
                                                              name=f"sllmd-watch-{name}")
                relay.start()

    def _relay(self, name: str) -> None:
        """Offers peer `name`'s events to this watch's queue until this watch ends or the peer fails."""
        try:
            updates = self.cluster.peer_watch(name, self.interval_s, self._sub.max_events)
        except Exception as e:   # noqa: BLE001 - not reachable now: tried again in PEERS_S
            log.debug("watching peer %s failed: %s", name, e)
            return
        try:
            for update in updates:
                if self._stopped.is_set():
                    break
                self._sub.add_dropped(int(update.get("dropped") or 0))
                for event in update.get("events") or []:
                    if isinstance(event, dict) and event.get("kind") != "node":
                        self._sub.offer(dict(event, node=event.get("node") or name))
        except Exception as e:   # noqa: BLE001 - the peer failed or left: its relay ends
            log.debug("the watch of peer %s ended: %s", name, e)
        finally:
            updates.close()

    # --- one update ---------------------------------------------------------------------------
    def frame(self, seq: int) -> bytes:
        """The encoded `update` reply: the snapshot's parts spliced in as the snapshot packed them."""
        events, dropped = self._sub.take()
        events = [e if "node" in e else dict(e, node=self._name) for e in events]
        snapshot = self._snapshot_items()
        data = (map_header(5) + pack("seq") + pack(seq) + pack("time") + pack(time.time())
                + pack("dropped") + pack(dropped)
                + pack("snapshot") + map_header(len(snapshot)) + b"".join(pack(k) + v for k, v in snapshot)
                + pack("events") + pack(events))
        return _UPDATE_HEAD + pack(self.request_id) + _DATA_KEY + data

    def _snapshot_items(self) -> list[tuple[str, bytes]]:
        snap = None
        try:
            snap = self.snapshots.take()
        except Exception:
            log.debug("taking a snapshot for a watcher failed", exc_info=True)
        items = [("status", self._packed(snap, "status"))]
        if self.cluster is not None:
            for key, read in (("models", self.cluster.models_all), ("ps", self.cluster.ps_all),
                              ("requests", self.cluster.requests_all), ("nodes", self.cluster.nodes)):
                items.append((key, self._read(read)))
        else:
            items += [("models", self._packed(snap, "models")), ("ps", self._packed(snap, "ps")),
                      ("requests", self._read(self._local_requests)), ("nodes", pack([]))]
        items.append(("loader", pack(_loader_counters())))
        return items

    @staticmethod
    def _packed(snap, kind: str) -> bytes:
        if snap is None:
            return pack(None)
        try:
            return snap.packed(kind)
        except Exception:   # noqa: BLE001 - the node failed that part: the watcher sees it missing
            return pack(None)

    @staticmethod
    def _read(read: Callable[[], Any]) -> bytes:
        try:
            return pack(read())
        except Exception:   # noqa: BLE001
            log.debug("a watch snapshot part failed", exc_info=True)
            return pack(None)

    def _local_requests(self) -> list[dict]:
        read = getattr(self.node, "requests", None)
        if read is None:
            return []
        name = getattr(getattr(self.node, "config", None), "node_name", None) or socket.gethostname()
        return [dict(r, node=name) for r in read()]


__all__ = ["WINDOW", "Watch"]
