"""The device tier: model instances within a memory budget.

On a CUDA host the budget is GPU memory; on a CPU-only host the "device" is
host memory (partition buffers from a pre-faulted arena). A load first
reserves its bytes: idle instances are evicted, least recently used first
(reason `pressure`), until it fits; an instance that serves, has queued
requests or holds a lease is never evicted. Each instance's keep_alive
deadline comes from the last request or load that finished on it.

Callbacks: on_evicting(name, reason) runs under the tier's lock the moment an
instance is chosen for eviction (it must take only leaf locks); on_evict(name,
reason) runs outside the lock once the instance has stopped.

Room: reserve() may wait (bounded) for busy instances to go idle; a model larger
than the whole budget is refused at once with TooLargeError (it never fits).
"""
from __future__ import annotations

import gc
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from ..errors import LoadCancelledError, ModelInUseError, OutOfMemoryError, TooLargeError
from ..inference.engine import Instance
from . import policy
from .states import EvictReason

log = logging.getLogger(__name__)


def human_bytes(n: int) -> str:
    """1.5 GiB, 258 MiB, 1 KiB, 100 B: sizes in messages people read."""
    for unit, power in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << power:
            value = n / (1 << power)
            return f"{value:.3g} {unit}" if value < 1000 else f"{value:.0f} {unit}"
    return f"{n} B"


@dataclass
class Slot:
    name: str
    nbytes: int
    instance: Instance | None = None  # None while loading
    leases: int = 0  # requests admitted by the node and not yet finished
    last_used: float = 0.0
    loaded_at: float | None = None
    expires_at: float | None = None  # None = never (or not yet loaded)
    load_tier: str | None = None
    load_s: float | None = None
    kv_bytes: int = 0  # the instance's batch KV cache, reserved as requests join (reserve_kv)

    @property
    def busy(self) -> bool:
        return self.instance is None or self.leases > 0 or self.instance.busy


class DeviceTier:
    def __init__(self, device: str, budget_bytes: int,
                 on_evict: Callable[[str, EvictReason], None] | None = None,
                 clock: Callable[[], float] = time.time,
                 on_evicting: Callable[[str, EvictReason], None] | None = None):
        self.device = device
        self.budget = budget_bytes
        self.on_evict = on_evict
        self.on_evicting = on_evicting
        self.clock = clock
        self._lock = threading.RLock()
        self._room = threading.Condition(self._lock)  # notified whenever an instance may have become evictable
        self._slots: dict[str, Slot] = {}
        self._stopping: dict[str, Slot] = {}  # chosen for eviction, instance still stopping

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(s.nbytes + s.kv_bytes for s in self._slots.values())

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._slots

    def get(self, name: str) -> Slot | None:
        with self._lock:
            return self._slots.get(name)

    def loaded(self, name: str) -> bool:
        with self._lock:
            s = self._slots.get(name)
            return s is not None and s.instance is not None

    def slots(self) -> list[Slot]:
        with self._lock:
            return sorted(self._slots.values(), key=lambda s: s.name)

    def stopping(self, name: str) -> bool:
        """True while an evicted instance of `name` is still stopping."""
        with self._lock:
            return name in self._stopping

    # --- loading ------------------------------------------------------------------
    def reserve(self, name: str, nbytes: int, wait_s: float = 0.0,
                cancelled: Callable[[], bool] | None = None) -> list[str]:
        """Holds nbytes of the budget for a load of `name`, evicting idle instances under
        pressure. TooLargeError when it can never fit; when every other instance is busy,
        waits up to wait_s for one to go idle, then OutOfMemoryError (LoadCancelledError
        as soon as cancelled() is true)."""
        deadline = time.monotonic() + max(0.0, wait_s)
        with self._lock:
            if name in self._slots:
                raise ValueError(f"{name} already has a device slot")
            if nbytes > self.budget:
                raise TooLargeError(f"model {name!r} needs {human_bytes(nbytes)}; the device budget on {self.device} "
                                    f"is {human_bytes(self.budget)}")
            while True:
                cands = [policy.Candidate(s.name, s.nbytes, s.last_used, busy=s.busy) for s in self._slots.values()]
                victims = policy.choose_victims(cands, nbytes, self.budget - self.used_bytes)
                if victims is not None:
                    break
                if cancelled is not None and cancelled():
                    raise LoadCancelledError(f"the load of {name!r} was cancelled while it waited for device room")
                left = deadline - time.monotonic()
                if left <= 0:
                    waited = f" after waiting {wait_s:.3g} s" if wait_s > 0 else ""
                    raise OutOfMemoryError(
                        f"model {name!r} needs {human_bytes(nbytes)} on {self.device}; "
                        f"{human_bytes(self.budget - self.used_bytes)} of {human_bytes(self.budget)} are free and "
                        f"every other instance is serving{waited}; retry later")
                self._room.wait(timeout=min(left, 0.1))
            evicted = [self._take(v, EvictReason.PRESSURE) for v in victims]
            self._slots[name] = Slot(name, nbytes, last_used=self.clock())
        for slot in evicted:
            self._finish_eviction(slot, EvictReason.PRESSURE)
        return victims

    def commit(self, name: str, instance: Instance, keep_alive_s: float, load_tier: str, load_s: float,
               leases: int = 0) -> Slot:
        """The load finished: the slot holds a ready instance, with `leases` already taken
        (handed to the requests that waited for it, so none can lose it to an eviction)."""
        with self._lock:
            s = self._slots[name]
            now = self.clock()
            s.instance, s.loaded_at, s.last_used, s.leases = instance, now, now, leases
            s.load_tier, s.load_s = load_tier, load_s
            s.expires_at = policy.expires_at(keep_alive_s, now)
            return s

    def abort(self, name: str) -> None:
        """The load failed: its reservation is given back."""
        with self._lock:
            s = self._slots.get(name)
            if s is not None and s.instance is None:
                del self._slots[name]
                self._room.notify_all()

    # --- serving ------------------------------------------------------------------
    def lease(self, name: str) -> Instance | None:
        """The ready instance with a lease taken (it cannot be evicted until unlease)."""
        with self._lock:
            s = self._slots.get(name)
            if s is None or s.instance is None:
                return None
            s.leases += 1
            s.last_used = self.clock()
            return s.instance

    def unlease(self, name: str, keep_alive_s: float) -> None:
        """A request finished: its keep_alive sets the instance's deadline (the last one wins)."""
        with self._lock:
            s = self._slots.get(name)
            if s is None:
                return
            s.leases = max(0, s.leases - 1)
            now = self.clock()
            s.last_used = now
            s.expires_at = policy.expires_at(keep_alive_s, now)
            self._room.notify_all()

    def keep_alive(self, name: str, keep_alive_s: float) -> None:
        with self._lock:
            s = self._slots.get(name)
            if s is not None and s.instance is not None:
                now = self.clock()
                s.last_used = now
                s.expires_at = policy.expires_at(keep_alive_s, now)

    def reserve_kv(self, name: str, nbytes: int) -> bool:
        """Counts nbytes more of `name`'s KV cache in the budget; False (nothing counted)
        when the budget has no free room for them. Never evicts: a request that does not
        fit waits in its instance's queue."""
        with self._lock:
            s = self._slots.get(name)
            if s is None or nbytes > self.budget - self.used_bytes:
                return False
            s.kv_bytes += nbytes
            return True

    def release_kv(self, name: str, nbytes: int) -> None:
        with self._lock:
            s = self._slots.get(name) or self._stopping.get(name)
            if s is not None:
                s.kv_bytes = max(0, s.kv_bytes - nbytes)
                self._room.notify_all()

    # --- eviction -------------------------------------------------------------------
    def evict(self, name: str, reason: EvictReason = EvictReason.MANUAL) -> bool:
        """Unloads an idle instance; False when there is none; ModelInUseError while it serves or loads."""
        with self._lock:
            s = self._slots.get(name)
            if s is None:
                return False
            if s.busy:
                what = "loading" if s.instance is None else "serving requests"
                raise ModelInUseError(f"model {name!r} is {what}; it cannot be evicted now")
            self._take(name, reason)
        self._finish_eviction(s, reason)
        return True

    def evict_expired(self, now: float | None = None) -> list[str]:
        """Unloads instances whose keep_alive ran out (reason `idle`)."""
        now = self.clock() if now is None else now
        with self._lock:
            due = policy.expired(((s.name, s.expires_at, s.busy) for s in self._slots.values()), now)
            evicted = [self._take(n, EvictReason.IDLE) for n in due]
        for s in evicted:
            self._finish_eviction(s, EvictReason.IDLE)
        return [s.name for s in evicted]

    def next_deadline(self) -> float | None:
        with self._lock:
            return min((s.expires_at for s in self._slots.values() if s.expires_at is not None), default=None)

    def _take(self, name: str, reason: EvictReason) -> Slot:
        """Removes a slot chosen for eviction (caller holds the lock)."""
        slot = self._slots.pop(name)
        self._stopping[name] = slot
        if self.on_evicting is not None:
            self.on_evicting(name, reason)
        return slot

    def _finish_eviction(self, slot: Slot, reason: EvictReason) -> None:
        inst = slot.instance
        if inst is not None:
            inst.close(timeout=30.0, drain=True)
            inst.model = None  # the last references to the weights: the buffers go back
            slot.instance = None
            gc.collect()
            if self.device.startswith("cuda"):
                import torch
                torch.cuda.empty_cache()
        with self._lock:
            if self._stopping.get(slot.name) is slot:
                del self._stopping[slot.name]
            self._room.notify_all()
        log.info("evicted %s from %s (%s, %d bytes)", slot.name, self.device, reason.value, slot.nbytes)
        if self.on_evict is not None:
            self.on_evict(slot.name, reason)

    def close_all(self, timeout: float = 30.0, drain: bool = True) -> None:
        with self._lock:
            slots = list(self._slots.values())
            self._slots.clear()
            self._room.notify_all()
        for s in slots:
            if s.instance is not None:
                s.instance.close(timeout=timeout, drain=drain)
                s.instance.model = None

    def stats(self) -> dict:
        with self._lock:
            return {"used_bytes": self.used_bytes, "capacity_bytes": self.budget, "device": self.device,
                    "instances": sum(1 for s in self._slots.values() if s.instance is not None)}
