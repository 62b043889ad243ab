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
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import (CancelledError, LoadCancelledError, LoadError, LoadTimeoutError, OutOfMemoryError,
                      PoolExhaustedError, ShuttingDownError, SllmError)

log = logging.getLogger(__name__)


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
        self.waiters = 0  # guarded by Loads.lock
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


class Loads:
    """The loads in flight (one per model) and how they ended. `load(pending)` does the
    work on a thread of its own and returns (instance, tier, seconds), with the device
    slot reserved; this class hands the instance out. Its lock comes after the SSD
    store's and before the device tier's (it calls device.lease/commit/abort under it)."""

    TRANSIENT = (OutOfMemoryError, PoolExhaustedError, LoadCancelledError, ShuttingDownError, CancelledError)

    def __init__(self, device, load: Callable[[PendingLoad], tuple[Any, str, float]], *, keep_alive_s: float,
                 wait_s: float, on_change: Callable[[str | None], None],
                 on_loaded: Callable[[str, Any, str, float], None], on_failed: Callable[[str, BaseException], None]):
        self.device, self._load, self.keep_alive_s, self.wait_s = device, load, keep_alive_s, wait_s
        self._on_change, self._on_loaded, self._on_failed = on_change, on_loaded, on_failed
        self.lock = threading.Lock()
        self._pending: dict[str, PendingLoad] = {}
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._counts = {"ok": 0, "failed": 0, "busy": 0, "cancelled": 0}
        self._failures: dict[str, dict] = {}  # name -> the last load's error, until a newer load or forget()

    def __contains__(self, name: str) -> bool:
        with self.lock:
            return name in self._pending

    def pending(self, name: str) -> PendingLoad | None:
        with self.lock:
            return self._pending.get(name)

    def failure(self, name: str) -> dict | None:
        """{"error", "at", "permanent"} of the last load of `name` when it failed."""
        with self.lock:
            f = self._failures.get(name)
            return dict(f) if f else None

    def forget(self, name: str) -> None:
        with self.lock:
            self._failures.pop(name, None)

    def counts(self) -> dict:
        with self.lock:
            return dict(self._counts, in_flight=len(self._pending))

    def acquire(self, name: str, keep_alive_s: float, cancelled: Callable[[], bool] | None = None,
                check_open: Callable[[], None] = lambda: None) -> Acquired:
        """A ready instance of `name` with a lease taken for the caller, loading it if it
        has none (one load per model, shared by every caller waiting for it). The wait is
        bounded by wait_s; a caller that gives up leaves, and a load that every caller
        left is cancelled."""
        with self.lock:
            check_open()
            if self._closed:
                raise ShuttingDownError("sllmd is shutting down")
            inst = self.device.lease(name)
            if inst is not None:
                return Acquired(inst, "device", 0.0, 0.0, True)
            load = self._pending.get(name)
            started = load is None
            if started:
                load = self._pending[name] = PendingLoad(name)
                t = threading.Thread(target=self._run, args=(load,), name=f"sllm-load-{name}", daemon=True)
                self._threads = [w for w in self._threads if w.is_alive()] + [t]
                t.start()
            load.waiters += 1
        if started:
            self._on_change(name)
        gone = (lambda: self._closed or cancelled()) if cancelled is not None else (lambda: self._closed)
        if load.wait(self.wait_s, gone):
            return load.acquired()
        with self.lock:
            finished = load.done.is_set()
            if not finished:
                load.waiters -= 1
                if load.waiters == 0:
                    load.cancelled.set()
        if finished and load.error is None:  # it finished as this caller gave up: hand the lease back
            self.device.unlease(name, keep_alive_s)
        if self._closed:
            raise ShuttingDownError("sllmd is shutting down")
        if cancelled is not None and cancelled():
            raise CancelledError(f"the request was cancelled while {name!r} loaded")
        raise LoadTimeoutError(f"{name!r} did not finish loading within {self.wait_s:g} s; retry later")

    def close(self, timeout: float) -> None:
        """Cancels the loads in flight and waits up to `timeout` for each."""
        with self.lock:
            self._closed = True
            for load in self._pending.values():
                load.cancelled.set()
            threads = list(self._threads)
        for t in threads:
            t.join(timeout)

    def _run(self, load: PendingLoad) -> None:
        """The loading thread: loads, then commits the instance with one lease per waiter
        in the same step; a load that every waiter left is discarded."""
        name = load.name
        try:
            inst, tier, load_s = self._load(load)
        except BaseException as e:
            err = self._failed(name, e)
            with self.lock:
                load.error = err
                load.done.set()
                self._pending.pop(name, None)
            self._on_change(name)
            return
        with self.lock:
            keep = load.waiters > 0 and not self._closed and not load.cancelled.is_set()
            if keep:
                self._failures.pop(name, None)
                self._counts["ok"] += 1
                self.device.commit(name, inst, self.keep_alive_s, tier, load_s, leases=load.waiters)
                load.instance, load.tier, load.load_s = inst, tier, load_s
            else:
                self._counts["cancelled"] += 1
                self.device.abort(name)
                load.error = (ShuttingDownError("sllmd is shutting down") if self._closed else
                              LoadCancelledError(f"the load of {name!r} was cancelled: nobody waits for it"))
            load.done.set()
            self._pending.pop(name, None)
        if keep:
            self._on_loaded(name, inst, tier, load_s)
        else:
            inst.close(timeout=5.0, drain=False)
            inst.model = None
            log.info("discarded the load of %s: %s", name, load.error)
        self._on_change(name)

    def _failed(self, name: str, exc: BaseException) -> BaseException:
        """Records a failed load and says why in one error. A transient one (no room now,
        cancelled, shutting down) leaves the model as it was; any other is permanent
        (on_failed then drops what the model holds)."""
        if isinstance(exc, SllmError):
            err: BaseException = exc
        elif isinstance(exc, Exception):
            err = LoadError(f"loading {name!r} failed: {type(exc).__name__}: {exc}")
            err.__cause__ = exc
        else:
            err = exc
        transient = isinstance(err, self.TRANSIENT)
        kind = ("cancelled" if isinstance(err, (LoadCancelledError, ShuttingDownError, CancelledError)) else
                "busy" if transient else "failed")
        with self.lock:
            self._counts[kind] += 1
            self._failures[name] = {"error": str(err), "at": time.time(), "permanent": not transient}
        if not transient:
            log.warning("loading %s failed: %s", name, err)
            self._on_failed(name, err)
        return err
