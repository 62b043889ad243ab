"""The node's read-only answers (status, models, ps, nodes), taken once and served many times.

The server's I/O thread answers a read from the current snapshot without a
worker hop and without touching a tier lock, as long as the snapshot is
fresh: taken at the node's current `version` (an int the node bumps on every
state change) and less than `max_age_s` ago (for figures that move without a
state change: loader counters, when a peer was last heard). `requests` is not
among them: a request's state and tokens move on every step, and a read of
them takes only the instances' own locks, briefly.
A stale snapshot is retaken on a worker, never on the I/O thread. The replies'
msgpack bytes are made once per snapshot: serving one is a few bytes of header
around them.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from .protocol.codec import encode_packed_result, pack

log = logging.getLogger(__name__)

READ_ONLY = ("status", "models", "ps", "nodes")
LIST_PARTS = ("models", "ps", "nodes")


def map_header(n: int) -> bytes:
    """The msgpack header of a map with `n` entries."""
    if n < 16:
        return bytes([0x80 | n])
    if n < 1 << 16:
        return b"\xde" + n.to_bytes(2, "big")
    return b"\xdf" + n.to_bytes(4, "big")


class Snapshot:
    """One consistent read of the node. A part that failed keeps its exception (answered as an error)."""

    __slots__ = ("version", "taken_at", "_started_at", "_status_items", "_n_status_items", "_lists")

    def __init__(self, node: Any, version: int | None, parts: tuple[str, ...] = READ_ONLY,
                 readers: dict[str, Callable[[], list]] | None = None):
        self.version = version
        self.taken_at = time.monotonic()
        self._lists: dict[str, bytes | BaseException] = {}
        self._started_at: float | None = None
        self._status_items: bytes | BaseException = KeyError("status")
        self._n_status_items = 0
        if "status" in parts:
            self._take_status(node)
        readers = dict({"models": node.models, "ps": node.ps}, **(readers or {}))
        for kind in LIST_PARTS:
            read = readers.get(kind)
            if kind not in parts or read is None:
                continue
            try:
                self._lists[kind] = pack(list(read()))
            except Exception as e:   # noqa: BLE001 - answered to the reader, as the handler would have raised it
                self._lists[kind] = e

    def _take_status(self, node: Any) -> None:
        try:
            status = dict(node.status())
            started_at = status.get("started_at")
            if isinstance(started_at, int | float) and "uptime_s" in status:   # uptime is computed when served
                self._started_at = started_at
                del status["uptime_s"]
            self._status_items = b"".join(pack(k) + pack(v) for k, v in status.items())
            self._n_status_items = len(status)
        except Exception as e:   # noqa: BLE001 - answered to the reader, as the handler would have raised it
            self._status_items = e

    def packed(self, kind: str) -> bytes:
        """The packed data of part `kind` (status without its "daemon" section), for a watch update;
        raises what the node raised for that part."""
        if kind != "status":
            data = self._lists[kind]
            if isinstance(data, BaseException):
                raise data
            return data
        items = self._status_items
        if isinstance(items, BaseException):
            raise items
        if self._started_at is None:
            return map_header(self._n_status_items) + items
        return (map_header(self._n_status_items + 1) + items + pack("uptime_s")
                + pack(time.time() - self._started_at))

    def reply(self, kind: str, request_id: int, daemon: Callable[[], dict]) -> bytes:
        """The `result` frame for a `kind` request; raises what the node raised for that part.
        `daemon()` gives the status reply's live "daemon" section."""
        if kind == "status":
            items = self._status_items
            if isinstance(items, BaseException):
                raise items
            extra = pack("daemon") + pack(daemon())
            n = self._n_status_items + 1
            if self._started_at is not None:
                extra += pack("uptime_s") + pack(time.time() - self._started_at)
                n += 1
            return encode_packed_result(request_id, map_header(n) + items + extra)
        data = self._lists[kind]
        if isinstance(data, BaseException):
            raise data
        return encode_packed_result(request_id, data)


class Snapshots:
    """The current snapshot of `node`, and when it must be retaken."""

    def __init__(self, node: Any, max_age_s: float = 1.0, readers: dict[str, Callable[[], list]] | None = None,
                 also_changes: Callable[[], int] | None = None):
        """readers: the list parts beyond models and ps (nodes), as the server answers them.
        also_changes: a counter that moves when such a part changes without the node's version
        (the cluster's serial: a peer's pulled state, a member's status)."""
        self.node = node
        self.max_age_s = max_age_s
        self.readers = readers or {}
        self.also_changes = also_changes
        self._current: Snapshot | None = None
        self._lock = threading.Lock()   # one retake at a time

    def node_version(self) -> int | tuple[int, int] | None:
        """What a snapshot is keyed on: the node's version (and the also_changes counter)."""
        version = getattr(self.node, "version", None)
        if not isinstance(version, int):
            return None
        return version if self.also_changes is None else (version, self.also_changes())

    def fresh(self) -> Snapshot | None:
        """The snapshot if it still describes the node (any thread; takes no lock); else None."""
        snap = self._current
        if snap is None or snap.version is None or snap.version != self.node_version():
            return None
        if time.monotonic() - snap.taken_at > self.max_age_s:
            return None
        return snap

    def take(self, force: bool = False, kind: str | None = None) -> Snapshot:
        """A fresh snapshot, retaken unless the current one is still fresh (or always, with force).
        Runs the node's read methods: call it on a worker, never on the I/O thread. A node without
        a version is read afresh every time, only the part `kind` if given."""
        if self.node_version() is None:
            return Snapshot(self.node, None, (kind,) if kind else READ_ONLY, self.readers)
        with self._lock:
            if not force:
                snap = self.fresh()
                if snap is not None:
                    return snap
            version = self.node_version()   # read before the parts: a change meanwhile makes it stale
            snap = Snapshot(self.node, version, READ_ONLY, self.readers)
            self._current = snap
            return snap

    def stale(self) -> bool:
        """Whether a versioned node's snapshot should be retaken (no lock, cheap)."""
        return self.node_version() is not None and self.fresh() is None


__all__ = ["READ_ONLY", "Snapshot", "Snapshots", "map_header"]
