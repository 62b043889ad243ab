"""The events of one load, for watchers (sllmd.events): load_started, load_progress, load_finished, load_failed.

The bytes move in native threads that report no progress of their own, so
load_progress is sampled every `period_s` from the loader's process-wide
counters (bytes read from disk, bytes copied out of the DRAM tier, bytes sent
to the device), and only while someone watches. Loads running at once share
those counters: each one's `done` is then an upper bound, capped at its size.
"""
from __future__ import annotations

import logging
import threading
import time

from ..events import EventBus

log = logging.getLogger(__name__)

PERIOD_S = 0.1
_MOVED = ("bytes_read", "bytes_dram", "bytes_h2d")


def _moved() -> dict[str, int]:
    try:
        from .. import pool
        c = pool.counters()
        return {k: int(c.get(k) or 0) for k in _MOVED}
    except Exception:   # noqa: BLE001 - no native loader: no progress figures
        return dict.fromkeys(_MOVED, 0)


class LoadEvents:
    def __init__(self, bus: EventBus, model: str, period_s: float = PERIOD_S):
        self.bus, self.model, self.period_s = bus, model, period_s
        self.tier: str | None = None
        self.total = 0
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def started(self, tier: str, total: int, **fields) -> None:
        """The bytes start moving from `tier` (where they are expected to come from)."""
        self.tier, self.total, self._t0 = tier, int(total or 0), time.monotonic()
        self.bus.publish("load_started", model=self.model, tier=tier, bytes=self.total, done=0, total=self.total,
                         **fields)
        if self.bus.watched and self.total > 0:
            self._thread = threading.Thread(target=self._sample, name=f"sllm-load-progress-{self.model}",
                                            daemon=True)
            self._thread.start()

    def finished(self, tier: str, seconds: float) -> None:
        self.stop()
        self.bus.publish("load_finished", model=self.model, tier=tier, seconds=seconds, bytes=self.total,
                         done=self.total, total=self.total, bandwidth=self.total / seconds if seconds > 0 else None)

    def failed(self, err: BaseException) -> None:
        self.stop()
        self.bus.publish("load_failed", model=self.model, tier=self.tier, code=getattr(err, "code", "internal"),
                         error=str(err) or type(err).__name__, seconds=time.monotonic() - self._t0)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(1.0)
            self._thread = None

    def _sample(self) -> None:
        base = _moved()
        while not self._stop.wait(self.period_s):
            now = _moved()
            done = min(self.total, max(now[k] - base[k] for k in _MOVED))
            elapsed = time.monotonic() - self._t0
            self.bus.publish("load_progress", model=self.model, tier=self.tier, done=done, total=self.total,
                             bandwidth=done / elapsed if elapsed > 0 else None)


__all__ = ["LoadEvents"]
