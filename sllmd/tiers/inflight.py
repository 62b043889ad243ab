"""A model's load in flight, shared by every request that waits for it.

The node keeps one PendingLoad per model being loaded. A request that finds no
ready instance joins it (or starts it) and waits, bounded; the load runs on its
own thread. When it finishes, the node commits the instance with one lease per
waiter in the same step, so no waiter can lose the instance to an idle eviction
(keep_alive 0) before its request runs. A waiter that gives up (its client went
away, its wait ran out, the daemon stops) leaves; when the last one has left,
the load is cancelled.
"""
from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import SllmError


@dataclass
class Acquired:
    """What a request gets: an instance with a lease taken for it (unlease when done)."""

    instance: Any
    tier: str  # where the weights came from: device (already loaded), dram or ssd
    load_s: float
    room_wait_s: float  # time the load waited for room on the device
    already_loaded: bool


class PendingLoad:
    """One load; its fields are written by the loading thread before `done` is set."""

    def __init__(self, name: str):
        self.name = name
        self.waiters = 0  # guarded by the node's load lock
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.started_at = time.time()
        self.instance: Any = None
        self.tier: str | None = None
        self.load_s = 0.0
        self.room_wait_s = 0.0
        self.error: BaseException | None = None

    def wait(self, timeout_s: float, give_up: Callable[[], bool], poll_s: float = 0.05) -> bool:
        """True once the load is done; False when timeout_s passed or give_up() said so first."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if self.done.wait(timeout=max(0.0, min(poll_s, left))):
                return True
            if left <= 0 or give_up():
                return self.done.is_set()

    def acquired(self) -> Acquired:
        """The result for one waiter: its lease, or the load's error (a copy per waiter)."""
        if self.error is not None:
            raise _copy(self.error)
        return Acquired(self.instance, self.tier or "ssd", self.load_s, self.room_wait_s, False)


def _copy(exc: BaseException) -> BaseException:
    """Each waiter raises its own exception object (tracebacks are per raise)."""
    try:
        dup = copy.copy(exc)
    except Exception:
        return exc
    if isinstance(exc, SllmError):
        dup.__cause__ = exc.__cause__
    return dup
