"""The node: this host's tiers, model states and instances, behind the calls the
server makes (DESIGN.md sections 4 and 5). Thread-safe: server handlers call it
from worker threads.

Locks: `Node._lock` is a leaf (it guards the node's own maps and is never held
while calling into a tier), so tier callbacks may take it. Tiers lock
themselves; their order is ssd -> dram/device -> instance.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future
from typing import Callable, Iterator

from . import pool as pool_mod
from .errors import LoadError, OutOfMemoryError, SllmError
from .inference.engine import Instance
from .errors import InvalidRequestError
from .inference.request import InferRequest
from .model_card import model_card
from .store.format import open_checkpoint
from .tiers import policy
from .tiers.device import DeviceTier, Slot
from .tiers.dram import DramTier
from .errors import ModelFailedError, ShuttingDownError
from .tiers.loader import device_bytes, load_instance
from .tiers.prepare import Preparer
from .tiers.ssd import SsdStore
from .tiers.states import EvictReason, InvalidTransition, ModelState, StateMachine, Tier

log = logging.getLogger(__name__)

TIMER_CEILING_S = 1.0
LOAD_ATTEMPTS = 3


class Node:
    def __init__(self, config):
        self.config = config
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._records: dict[str, StateMachine] = {}
        self._loading: dict[str, Future] = {}
        self._prepared = Preparer(self._stop.is_set)
        self._evictions: collections.deque[dict] = collections.deque(maxlen=64)
        self._closed = False
        self._started_at: float | None = None
        self._timer: threading.Thread | None = None
        self.ssd = SsdStore(config.store_dir, config.ssd_capacity_bytes, on_evict=self._on_ssd_evict)
        self.pool: pool_mod.ChunkPool | None = None
        self.dram: DramTier | None = None
        self.arena: pool_mod.HostArena | None = None
        self.device = DeviceTier(config.device, config.device_memory_bytes, on_evict=self._on_device_evict,
                                 on_evicting=self._on_device_evicting)

    # --- lifecycle ------------------------------------------------------------------
    def start(self) -> None:
        """Rebuilds the catalog from disk, starts pre-faulting the pool and the idle-eviction timer."""
        if self._started_at is not None or self._closed:
            raise RuntimeError("a node starts once")
        self.ssd.open()
        for e in self.ssd.entries():
            self._records[e.name] = self._fresh_record(e.error)
        if self.config.dram_bytes >= self.config.chunk_size:
            self.pool = pool_mod.ChunkPool(self.config.dram_bytes, self.config.chunk_size)
            self.pool.prefault()
            self.dram = DramTier(self.pool, on_evict=self._on_dram_evict)
        if self.config.device.startswith("cpu") and self.config.device_memory_bytes > 0:
            self.arena = pool_mod.HostArena(self.config.device_memory_bytes, prefault=True)
        self.ssd.is_busy = self._held_above_ssd
        self._started_at = time.time()
        self._timer = threading.Thread(target=self._expiry_loop, name="sllm-keepalive", daemon=True)
        self._timer.start()
        self._prepared.warm_up()
        self._prepare(None)
        log.info("node started: %d models; dram %d bytes; %s budget %d bytes", len(self._records),
                 self.config.dram_bytes, self.config.device, self.config.device_memory_bytes)

    def close(self) -> None:
        """Idempotent. Queued requests get an error; running ones finish (within the
        shutdown grace); loads in flight are waited for; nothing is left half written."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            loading = list(self._loading.values())
        self._stop.set()
        self._wake.set()
        self.ssd.cancel_imports()  # kills their converters and removes what they wrote
        grace = float(getattr(self.config, "shutdown_grace_s", 10.0))
        for fut in loading:
            try:
                fut.result(timeout=grace)
            except Exception:
                pass
        self.device.close_all(timeout=grace, drain=True)
        if self._timer is not None:
            self._timer.join(timeout=5)
        self._prepared.join(timeout=30)
        if self.dram is not None:
            self.dram.clear()
        self.ssd.close()
        log.info("node closed")

    def _prepare(self, names: list[str] | None) -> None:
        """Prepares skeletons and tokenizers of these models (all when None) in the background."""
        entries = [e for e in self.ssd.entries() if e.error is None and (names is None or e.name in names)]
        if entries:
            self._prepared.prepare((e.name, e.path) for e in entries)

    def _check_open(self) -> None:
        if self._closed:
            raise ShuttingDownError("sllmd is shutting down")
        if self._started_at is None:
            raise ShuttingDownError("the node has not started")

    def _expiry_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.device.evict_expired()
                self.ssd.flush()
            except Exception:
                log.exception("idle eviction failed")
            delay = policy.next_wakeup([self.device.next_deadline()], time.time(), TIMER_CEILING_S)
            self._wake.wait(timeout=max(delay, 0.01))
            self._wake.clear()

    # --- states -----------------------------------------------------------------------
    @staticmethod
    def _fresh_record(error: str | None) -> StateMachine:
        sm = StateMachine()
        if error:  # found broken in the store: failed before any load (force: no on_ssd -> failed edge)
            sm.transition(ModelState.FAILED, tier=Tier.SSD, error=error, force=True)
        return sm

    def _record(self, name: str) -> StateMachine:
        sm = self._records.get(name)
        if sm is None:
            sm = self._records[name] = StateMachine()
        return sm

    def _transition(self, name: str, state: ModelState, **kw) -> None:
        with self._lock:
            sm = self._record(name)
            try:
                sm.transition(state, **kw)
            except InvalidTransition as e:  # a bug, but the tiers are the truth: say so and go on
                log.error("model %s: %s (history: %s)", name, e, [r.state.value for r in sm.history])
                sm.transition(state, force=True, **kw)

    def _held_above_ssd(self, name: str) -> bool:
        with self._lock:
            loading = name in self._loading
        return loading or name in self.device or (self.dram is not None and name in self.dram)

    def _note_eviction(self, name: str, tier: Tier, reason: EvictReason) -> None:
        self._evictions.append({"name": name, "tier": tier.value, "reason": reason.value, "at": time.time()})

    def _on_device_evicting(self, name: str, reason: EvictReason) -> None:
        with self._lock:  # called under the device tier's lock: only this leaf lock here
            sm = self._record(name)
            if sm.state in (ModelState.LOADED, ModelState.MIGRATING):
                sm.transition(ModelState.EVICTING, reason=reason)

    def _on_device_evict(self, name: str, reason: EvictReason) -> None:
        self._note_eviction(name, Tier.DEVICE, reason)
        if not self._stop.is_set():
            self._prepare([name])  # its next load finds the model already built
        in_dram = self.dram is not None and name in self.dram  # outside _lock: it stays a leaf
        with self._lock:
            sm = self._record(name)
            if sm.state == ModelState.EVICTING:
                sm.transition(ModelState.IN_DRAM if in_dram else ModelState.ON_SSD)

    def _on_dram_evict(self, name: str, reason: EvictReason) -> None:
        self._note_eviction(name, Tier.DRAM, reason)
        with self._lock:
            sm = self._record(name)
            if sm.state == ModelState.IN_DRAM:
                sm.transition(ModelState.EVICTING, reason=reason)
                sm.transition(ModelState.ON_SSD)

    def _on_ssd_evict(self, name: str, reason: EvictReason) -> None:
        self._note_eviction(name, Tier.SSD, reason)
        with self._lock:
            self._records.pop(name, None)
        self._prepared.forget(name)

    # --- catalog ------------------------------------------------------------------------
    def import_model(self, name: str, source: str, progress: Callable[[int, int], None] | None = None,
                     notify: Callable[[str, dict], None] | None = None,
                     cancelled: Callable[[], bool] | None = None, no_tokenizer: bool = False) -> dict:
        """Imports SOURCE as NAME (SsdStore.import_model); the reply lists under "evicted" every
        model that --ssd-capacity made it remove, and notify hears each as it happens. Only a
        model that can be served is imported (no_tokenizer: one without a tokenizer is)."""
        self._check_open()
        evicted: list[dict] = []

        def relay(event: str, data: dict) -> None:
            if event == "evicted":
                evicted.append(data)
            if notify is not None:
                notify(event, data)

        self.ssd.import_model(name, source, progress, notify=relay, cancelled=cancelled, servable=True,
                              tokenizer=not no_tokenizer)
        with self._lock:
            self._records[name] = StateMachine()
        self._prepared.forget(name)
        self._prepare([name])
        info = self._model_info(name)
        info["evicted"] = evicted
        return info

    def _tiers_of(self, name: str) -> list[str]:
        tiers = [Tier.SSD.value] if name in self.ssd else []
        if self.dram is not None and name in self.dram:
            tiers.append(Tier.DRAM.value)
        if self.device.loaded(name):
            tiers.append(Tier.DEVICE.value)
        return tiers

    def _model_info(self, name: str) -> dict:
        e = self.ssd.get(name)
        slot = self.device.get(name)
        with self._lock:
            rec = self._record(name).record.to_dict()
        last_used = max(e.last_used, slot.last_used if slot else 0.0)
        return {"name": name, "size_bytes": e.nbytes, "checkpoint_bytes": e.checkpoint_bytes,
                "tiers": self._tiers_of(name), "state": rec["state"], "state_since": rec["since"],
                "device": self.config.device if slot and slot.instance else None,
                "reason": rec["reason"], "error": rec["error"] or e.error, "pinned": e.pinned,
                "last_used": last_used, "imported_at": e.imported_at, "source": e.source,
                "prepared": self._prepared.is_prepared(name)}   # the next load only moves and binds bytes

    def models(self) -> list[dict]:
        self._check_open()
        out = []
        for e in self.ssd.entries():
            try:
                out.append(self._model_info(e.name))
            except SllmError:
                continue  # removed meanwhile
        for job in self.ssd.importing():
            out.append({"name": job["name"], "size_bytes": None, "checkpoint_bytes": None, "tiers": [],
                        "state": "importing", "state_since": job["started_at"], "device": None, "reason": None,
                        "error": None, "pinned": False, "last_used": None, "imported_at": None,
                        "source": job["source"], "import": job})
        return out

    def show(self, name: str) -> dict:
        """`models`' entry for `name` plus its description from the checkpoint (model_card)."""
        self._check_open()
        info = self._model_info(name)
        info.update(model_card(self.ssd.get(name).path))
        return info

    def pin(self, name: str) -> None:
        self._check_open()
        self.ssd.set_pinned(name, True)

    def unpin(self, name: str) -> None:
        self._check_open()
        self.ssd.set_pinned(name, False)

    # --- loading ----------------------------------------------------------------------------
    def load(self, name: str, keep_alive: float | None = None) -> dict:
        """Makes sure `name` has a ready instance; keep_alive (seconds; negative = forever)
        sets how long it stays once idle."""
        self._check_open()
        ka = self._keep_alive(keep_alive)
        tier, load_s = self._ensure_loaded(name)
        self.device.keep_alive(name, ka)
        self._wake.set()
        info = self._model_info(name)
        info.update(load_tier=tier, load_s=load_s, expires_at=self._expires(name))
        return info

    def _keep_alive(self, value: float | None) -> float:
        try:
            return policy.keep_alive_or_default(value, self.config.keep_alive_s)
        except (TypeError, ValueError) as e:
            raise InvalidRequestError(f"keep_alive: {e}") from e

    def _expires(self, name: str) -> float | None:
        slot = self.device.get(name)
        return slot.expires_at if slot else None

    def _ensure_loaded(self, name: str) -> tuple[str, float]:
        """(tier the weights came from, seconds) once `name` has an instance; one load per
        model at a time: concurrent callers wait for the same load."""
        if self.device.loaded(name):
            return Tier.DEVICE.value, 0.0
        with self._lock:
            self._check_open()
            fut = self._loading.get(name)
            owner = fut is None
            if owner:
                fut = self._loading[name] = Future()
        if not owner:
            return fut.result()
        try:
            result = self._do_load(name)
            fut.set_result(result)
            return result
        except BaseException as e:
            fut.set_exception(e)
            raise
        finally:
            with self._lock:
                self._loading.pop(name, None)

    def _do_load(self, name: str) -> tuple[str, float]:
        if self.device.loaded(name):
            return Tier.DEVICE.value, 0.0
        entry = self.ssd.acquire(name)
        try:
            if entry.error:
                raise ModelFailedError(f"model {name!r} is unusable: {entry.error}")
            ckpt = open_checkpoint(entry.path)
            t0 = time.perf_counter()
            nbytes = device_bytes(ckpt, self.config.device, self.arena, self.config.compute_dtype)  # the cast size
            self._transition(name, ModelState.LOADING)
            try:
                self.device.reserve(name, nbytes)
                try:
                    loaded = load_instance(name, ckpt, self.config.device, dram=self.dram, arena=self.arena,
                                           verify=self.config.verify_checksums,
                                           tokenizer=self._prepared.tokenizer(name),
                                           skeleton=self._prepared.take_skeleton(name),
                                           compute_dtype=self.config.compute_dtype)
                    inst = Instance(name, loaded.model, loaded.tokenizer, device=self.config.device,
                                    nbytes=nbytes, queue_depth=self.config.queue_depth)
                    load_s = time.perf_counter() - t0
                    self.device.commit(name, inst, self.config.keep_alive_s, loaded.tier, load_s)
                except BaseException:
                    self.device.abort(name)
                    raise
            except OutOfMemoryError as e:  # transient: the device is full of serving instances
                in_dram = self.dram is not None and name in self.dram
                self._transition(name, ModelState.IN_DRAM if in_dram else ModelState.ON_SSD, error=str(e))
                raise
            except SllmError as e:
                self._transition(name, ModelState.FAILED, error=str(e))
                raise
            except Exception as e:
                self._transition(name, ModelState.FAILED, error=f"{type(e).__name__}: {e}")
                raise LoadError(f"loading {name!r} failed: {type(e).__name__}: {e}") from e
            self._prepared.keep_tokenizer(name, loaded.tokenizer)
            self._transition(name, ModelState.LOADED, device=self.config.device)
            if self._closed:  # close() ran while this loaded: do not leave an instance behind
                self.device.close_all()
                raise ShuttingDownError("sllmd is shutting down")
            self.ssd.touch(name)
            log.info("%s ready on %s from %s in %.3f s", name, self.config.device, loaded.tier, load_s)
            return loaded.tier, load_s
        finally:
            self.ssd.release(name)

    # --- instances --------------------------------------------------------------------------
    def _slot_info(self, s: Slot) -> dict:
        inst = s.instance
        with self._lock:
            state = self._record(s.name).state.value
        return {"name": s.name, "size_bytes": s.nbytes, "device": self.config.device,
                "tiers": self._tiers_of(s.name), "state": state if inst else ModelState.LOADING.value,
                "active_requests": inst.active if inst else 0, "queued": inst.queued if inst else 0,
                "expires_at": s.expires_at, "loaded_at": s.loaded_at, "last_used": s.last_used,
                "load_tier": s.load_tier, "load_s": s.load_s}

    def ps(self) -> list[dict]:
        self._check_open()
        return [self._slot_info(s) for s in self.device.slots()]

    def evict(self, name: str, tier: str = "device", force: bool = False) -> dict:
        """Evicts `name` from `tier`: device unloads the instance, dram drops the cached
        copy, ssd removes the model from every tier (as rm; a pinned one only with force,
        an import in flight is cancelled). Reason `manual`."""
        self._check_open()
        try:
            which = Tier.parse(tier)
        except ValueError as e:
            raise InvalidRequestError(str(e)) from None
        if which == Tier.SSD and self.ssd.cancel_import(name) and name not in self.ssd:
            return {"name": name, "tier": which.value, "evicted": [], "reason": EvictReason.MANUAL.value,
                    "state": None, "tiers": [], "cancelled_import": True}
        if which == Tier.SSD:
            self.ssd.check_removable(name, force)  # before anything is evicted from the faster tiers
        self.ssd.get(name)
        evicted = []
        if which in (Tier.DEVICE, Tier.SSD) and self.device.evict(name, EvictReason.MANUAL):
            evicted.append(Tier.DEVICE.value)
        if which in (Tier.DRAM, Tier.SSD) and self.dram is not None and self.dram.evict(name, EvictReason.MANUAL):
            evicted.append(Tier.DRAM.value)
        if which == Tier.SSD:
            self.ssd.remove(name, EvictReason.MANUAL, force=force)
            evicted.append(Tier.SSD.value)
            return {"name": name, "tier": which.value, "evicted": evicted, "reason": EvictReason.MANUAL.value,
                    "state": None, "tiers": []}
        info = self._model_info(name)
        return {"name": name, "tier": which.value, "evicted": evicted, "reason": EvictReason.MANUAL.value,
                "state": info["state"], "tiers": info["tiers"]}

    def remove(self, name: str, force: bool = False) -> dict:
        return self.evict(name, Tier.SSD.value, force=force)

    # --- inference ----------------------------------------------------------------------------
    def infer(self, req: InferRequest | dict, cancelled: threading.Event | None = None) -> Iterator[dict]:
        """Streams {"type": "token", ...} events and one {"type": "done", "stats": ...}.
        Loads the model from the fastest tier holding it if it has no instance. Closing
        the iterator cancels the request and frees its queue slot."""
        arrived = time.perf_counter()
        request = InferRequest.from_dict(req) if isinstance(req, dict) else req.validate()
        self._check_open()
        self.ssd.get(request.model)  # an unknown model fails here, before any streaming
        return self._infer(request, arrived, cancelled)

    def _infer(self, req: InferRequest, arrived: float, cancelled: threading.Event | None = None) -> Iterator[dict]:
        ka = self._keep_alive(req.keep_alive)
        inst = None
        for _ in range(LOAD_ATTEMPTS):
            tier, load_s = self._ensure_loaded(req.model)
            inst = self.device.lease(req.model)
            if inst is not None:
                break
        if inst is None:
            raise LoadError(f"{req.model!r} was evicted each time it loaded; the device is under heavy pressure")
        handle = None
        try:
            handle = inst.submit(req, arrived_at=arrived, cancelled=cancelled)  # `cancelled` stops even a prefill
            for event in handle:
                if event.get("type") == "done":
                    event["stats"].update(load_s=load_s, load_tier=tier)
                yield event
        finally:
            if handle is not None and not handle.done.is_set():
                handle.cancel()
            self.device.unlease(req.model, ka)
            self.ssd.touch(req.model)
            if ka == 0:
                self.device.evict_expired()  # "unload after the request", once nothing else runs on it
            self._wake.set()

    # --- status -----------------------------------------------------------------------------------
    def status(self) -> dict:
        self._check_open()
        dram = self.dram.stats() if self.dram is not None else {"used_bytes": 0, "capacity_bytes": 0, "models": 0}
        dram.pop("pool", None)
        return {
            "uptime_s": time.time() - self._started_at, "started_at": self._started_at,
            "device": self.config.device,
            "tiers": {"ssd": self.ssd.stats(), "dram": dram, "device": self.device.stats()},
            "loader": pool_mod.counters(),
            "pool": self.pool.stats() if self.pool is not None else None,
            "arena": ({"capacity_bytes": self.arena.capacity, "used_bytes": self.arena.used}
                      if self.arena is not None else None),
            "instances": [self._slot_info(s) for s in self.device.slots()],
            "models": len(self.ssd.entries()),
            "evictions": list(self._evictions),
        }
