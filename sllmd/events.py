"""The node's event bus: what happened (loads, evictions, requests, migrations, members), pushed to watchers.

    publishers (node, cluster, migration) ──publish(kind, **fields)──► EventBus ──► Subscription (one per watcher)
                                                                                      bounded queue, coalescing
                                                                                      ▼
                                                                    sllmd.watch: an `update` every interval_s

`publish` never blocks and costs one attribute read when nobody watches. Each
subscription holds at most `max_events` events: a newer progress event of the
same model (and tier) replaces the queued one in place, and a full queue drops
its oldest event; both count in `dropped`, which the next update reports. So a
watcher that stops reading costs a bounded amount of memory and never slows
the daemon down.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_MAX_EVENTS = 1000
# Event kinds whose newer event replaces a queued one with the same key fields.
COALESCE: dict[str, tuple[str, ...]] = {"load_progress": ("model", "tier"), "import_progress": ("model",)}


class Subscription:
    """One watcher's queue. `changed` is set whenever an event arrives (the watcher clears it)."""

    def __init__(self, max_events: int = DEFAULT_MAX_EVENTS):
        self.max_events = max(1, int(max_events))
        self.changed = threading.Event()
        self._lock = threading.Lock()
        self._queue: collections.deque[list] = collections.deque()   # cells [event], so coalescing replaces in place
        self._latest: dict[tuple, list] = {}                          # coalescing key -> its queued cell
        self._dropped = 0

    def offer(self, event: dict) -> None:
        keys = COALESCE.get(event["kind"])
        key = (event["kind"], *(event.get(k) for k in keys)) if keys else None
        with self._lock:
            if key is not None:
                cell = self._latest.get(key)
                if cell is not None:
                    cell[0] = event
                    self._dropped += 1
                    return
            if len(self._queue) >= self.max_events:
                old = self._queue.popleft()
                self._forget(old)
                self._dropped += 1
            cell = [event]
            self._queue.append(cell)
            if key is not None:
                self._latest[key] = cell
        self.changed.set()

    def add_dropped(self, n: int) -> None:
        """Counts events lost before they reached this queue (a relayed stream's own `dropped`)."""
        if n > 0:
            with self._lock:
                self._dropped += n

    def _forget(self, cell: list) -> None:
        keys = COALESCE.get(cell[0]["kind"])
        if keys:
            key = (cell[0]["kind"], *(cell[0].get(k) for k in keys))
            if self._latest.get(key) is cell:
                del self._latest[key]

    def take(self) -> tuple[list[dict], int]:
        """The queued events (oldest first) and how many were coalesced or dropped since the last take."""
        with self._lock:
            events = [cell[0] for cell in self._queue]
            dropped, self._dropped = self._dropped, 0
            self._queue.clear()
            self._latest.clear()
        return events, dropped

    def __len__(self) -> int:
        return len(self._queue)


class EventBus:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subs: tuple[Subscription, ...] = ()   # replaced, never mutated: publish reads it without the lock

    @property
    def watched(self) -> bool:
        """Whether anyone listens (a publisher may skip computing an event's fields when not)."""
        return bool(self._subs)

    def publish(self, kind: str, /, **fields: Any) -> None:
        subs = self._subs
        if not subs:
            return
        event = {"kind": kind, "time": time.time(), **fields}
        for sub in subs:
            try:
                sub.offer(event)
            except Exception:   # a publisher must never fail because of a watcher
                log.exception("delivering a %s event failed", kind)

    def subscribe(self, max_events: int = DEFAULT_MAX_EVENTS) -> Subscription:
        sub = Subscription(max_events)
        with self._lock:
            self._subs = (*self._subs, sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subs = tuple(s for s in self._subs if s is not sub)

    def __len__(self) -> int:
        return len(self._subs)


__all__ = ["COALESCE", "DEFAULT_MAX_EVENTS", "EventBus", "Subscription"]
