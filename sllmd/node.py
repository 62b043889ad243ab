"""The node: this host's tiers and model instances, behind the calls the server
makes (DESIGN.md sections 4 and 5). Thread-safe: server handlers call it from
worker threads.

One source of truth: a model's state is derived from what the tiers hold
(states.derive_state) plus the loads in flight and the last failure, so
`models` and `ps` can never contradict the tiers. `version` goes up on every
change of that state (loads, evictions, imports, pins, requests starting and
ending), so a reader can tell a cached snapshot is stale.

Locks, in order: ssd -> loads (tiers.inflight.Loads: loads in flight and their
waiters) -> device -> dram -> `_lock` (a leaf: the node's own maps, never held
while calling into a tier) and the version lock (a leaf).
"""
from __future__ import annotations

import collections
import logging
import sys
import threading
import time
from typing import Callable, Iterator

from . import pool as pool_mod
from .cluster.bandwidth import Bandwidths
from .cluster.locality import ServiceTimes
from .cluster.migration_cost import MigrationCost
from .events import EventBus
from .errors import (CancelledError, InstanceClosedError, InvalidRequestError, LoadCancelledError,
                     ModelExistsError, ModelFailedError, ModelInUseError, ShuttingDownError, SllmError)
from .inference.engine import Instance
from .inference.request import InferRequest, RequestState
from .inference.tokenizer_lock import unwrap as unwrap_tokenizer
from .model_card import model_card
from .repository.fetcher import Fetcher, is_repository_url
from .observability.counters import UNKNOWN_MODEL, NodeStats, outcome_of
from .store.format import open_checkpoint
from .tiers import policy
from .tiers.device import DeviceTier, Slot
from .tiers.dram import DramTier
from .tiers.inflight import Acquired, Loads, PendingLoad
from .tiers.load_events import LoadEvents
from .tiers.loader import device_bytes, load_instance
from .tiers.prefault import BackgroundPrefault
from .tiers.prepare import Preparer
from .tiers.ssd import SsdStore
from .tiers.states import EvictReason, Tier, derive_state

log = logging.getLogger(__name__)

TIMER_CEILING_S = 1.0
LOAD_WAIT_S = 300.0  # the longest a request waits for its model's load (config: load_wait)
ROOM_WAIT_S = 30.0  # the longest a load waits for busy instances to leave room (config: room_wait)


class _DeviceKv:
    """An instance's KV cache counted in the device tier's budget (engine.KvBudget)."""

    def __init__(self, device: DeviceTier, name: str):
        self.device, self.name = device, name

    def try_reserve(self, nbytes: int) -> bool:
        return self.device.reserve_kv(self.name, nbytes)

    def release(self, nbytes: int) -> None:
        self.device.release_kv(self.name, nbytes)


class Node:
    def __init__(self, config):
        self.config = config
        self._lock = threading.Lock()
        self._version_lock = threading.Lock()
        self._version = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._last_eviction: dict[str, dict] = {}  # name -> {"tier", "reason", "at"}
        self._since: dict[str, float] = {}  # name -> when its state last changed
        self._prepared = Preparer(self._stop.is_set)
        self._evictions: collections.deque[dict] = collections.deque(maxlen=64)
        self._closed = False
        self._started_at: float | None = None
        self._timer: threading.Thread | None = None
        self._prefault: BackgroundPrefault | None = None
        self._room_wait_s = float(getattr(config, "room_wait_s", ROOM_WAIT_S))
        self.ssd = SsdStore(config.store_dir, config.ssd_capacity_bytes, on_evict=self._on_ssd_evict)
        self.pool: pool_mod.ChunkPool | None = None
        self.dram: DramTier | None = None
        self.arena: pool_mod.HostArena | None = None
        self.bandwidths = Bandwidths()  # measured by real loads: the cluster's placement reads them
        self.service_times = ServiceTimes()
        self.migration_cost = MigrationCost()  # a, b0 of a*(t_in + t_out) + b0, from this node's migrations
        self.events = EventBus()  # what happens here, pushed to watchers (sllmd.events, `watch`)
        self.stats = NodeStats()  # requests, loads, evictions, migrations, counted here for /metrics
        # --repository: a model in no local tier is downloaded into the SSD store first (DESIGN.md 11)
        self.repositories = Fetcher(config, self.ssd, self.bandwidths, stopping=self._stop.is_set)
        self.device = DeviceTier(config.device, config.device_memory_bytes, on_evict=self._on_device_evict,
                                 on_evicting=self._on_device_evicting)
        self.loads = Loads(self.device, self._load_instance, keep_alive_s=config.keep_alive_s,
                           wait_s=float(getattr(config, "load_wait_s", LOAD_WAIT_S)), on_change=self._bump,
                           on_loaded=self._on_loaded, on_failed=self._on_load_failed)

    # --- lifecycle ------------------------------------------------------------------
    def start(self) -> None:
        """Rebuilds the catalog from disk and starts the idle-eviction timer. Ready at once:
        the DRAM pool faults in on a throttled background thread, the CPU device arena
        on first use (a load faults its destination ahead of its reads)."""
        if self._started_at is not None or self._closed:
            raise RuntimeError("a node starts once")
        self.ssd.open()
        if self.config.dram_bytes >= self.config.chunk_size:
            self.pool = pool_mod.ChunkPool(self.config.dram_bytes, self.config.chunk_size)
            self.dram = DramTier(self.pool, on_evict=self._on_dram_evict)
            if self.config.device.startswith("cuda") and hasattr(self.pool, "pin_in_background"):
                self.pool.pin_in_background()  # pinning faults the pages in as well
            elif getattr(self.config, "prefault", True):
                self._prefault = BackgroundPrefault(self.pool.native.base_address, self.pool.native.mapped_bytes)
                self._prefault.start()
        if self.config.device.startswith("cpu") and self.config.device_memory_bytes > 0:
            self.arena = pool_mod.HostArena(self.config.device_memory_bytes, prefault=False)
        self.ssd.is_busy = self._held_above_ssd
        self._started_at = time.time()
        self._timer = threading.Thread(target=self._expiry_loop, name="sllm-keepalive", daemon=True)
        self._timer.start()
        self._prepared.warm_up(self.config.device)
        self._prepare(None)
        self._bump()
        log.info("node started: %d models; dram %d bytes; %s budget %d bytes", len(self.ssd.entries()),
                 self.config.dram_bytes, self.config.device, self.config.device_memory_bytes)

    def close(self) -> None:
        """Idempotent. Queued requests get an error; running ones finish (within the
        shutdown grace); loads in flight are cancelled and waited for; nothing is left
        half written."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        self._wake.set()
        if self._prefault is not None:
            self._prefault.stop()
        self.ssd.cancel_imports()  # kills their converters and removes what they wrote
        grace = float(getattr(self.config, "shutdown_grace_s", 10.0))
        self.loads.close(timeout=grace)
        self.device.close_all(timeout=grace, drain=True)
        if self._timer is not None:
            self._timer.join(timeout=5)
        self._prepared.join(timeout=30)
        if self.dram is not None:
            self.dram.clear()
        if self.pool is not None and hasattr(self.pool, "close"):
            try:
                self.pool.close()
            except Exception:
                log.exception("closing the chunk pool failed")
        self.ssd.close()
        self._bump()
        log.info("node closed")

    @property
    def version(self) -> int:
        """Goes up on every change of what models/ps/status report about models and tiers
        (not on counters and clocks, which change all the time)."""
        return self._version

    def changed(self) -> None:
        """Something `requests` shows changed without a tier changing (a request began or stopped
        migrating): the version moves, so no snapshot answers from before it."""
        self._bump()

    def _bump(self, name: str | None = None) -> None:
        """A change: the version goes up; with a name, that model's state changed now."""
        with self._version_lock:
            self._version += 1
            if name is not None:
                self._since[name] = time.time()

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

    # --- tier callbacks -----------------------------------------------------------------
    def _held_above_ssd(self, name: str) -> bool:
        """What keeps an SSD copy from eviction: a load reading it or an instance of it. A
        DRAM copy does not: it is dropped with the SSD copy."""
        return name in self.loads or name in self.device or self.device.stopping(name)

    def _note_eviction(self, name: str, tier: Tier, reason: EvictReason) -> None:
        record = {"name": name, "tier": tier.value, "reason": reason.value, "at": time.time()}
        self._evictions.append(record)
        self.events.publish("evicted", model=name, tier=tier.value, reason=reason.value)
        self.stats.eviction(tier.value, reason.value)
        with self._lock:
            self._last_eviction[name] = {k: record[k] for k in ("tier", "reason", "at")}
        self._bump(name)

    def _on_device_evicting(self, name: str, reason: EvictReason) -> None:
        self._bump(name)  # under the device tier's lock: leaf locks only

    def _on_device_evict(self, name: str, reason: EvictReason) -> None:
        self._note_eviction(name, Tier.DEVICE, reason)
        if not self._stop.is_set():
            self._prepare([name])  # its next load finds the model already built

    def _on_dram_evict(self, name: str, reason: EvictReason) -> None:
        self._note_eviction(name, Tier.DRAM, reason)

    def _on_ssd_evict(self, name: str, reason: EvictReason) -> None:
        """The model is gone from the store (rm, or capacity): its DRAM copy goes with it."""
        if self.dram is not None:
            try:
                self.dram.evict(name, reason)
            except ModelInUseError:
                log.warning("%s left the store while its DRAM copy was being read", name)
        self._note_eviction(name, Tier.SSD, reason)
        self.loads.forget(name)
        with self._lock:
            self._last_eviction.pop(name, None)
            self._since.pop(name, None)
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

        if is_repository_url(source):   # a repository, or a model in one: a verified, resumable download
            download = self.repositories.fetch(name, url=source, progress=self._import_progress(name, progress),
                                               notify=relay, cancelled=cancelled, tokenizer=not no_tokenizer)
            download.pop("entry", None)
            self._imported(name)
            return dict(self._model_info(name), evicted=evicted, download=download)
        self.ssd.import_model(name, source, self._import_progress(name, progress), notify=relay, cancelled=cancelled,
                              servable=True, tokenizer=not no_tokenizer)
        self._imported(name)
        return dict(self._model_info(name), evicted=evicted)

    def _import_progress(self, name: str, progress: Callable[[int, int], None] | None) -> Callable[[int, int], None]:
        """`progress`, and an import_progress event for watchers (coalesced per model by the bus)."""
        def report(done: int, total: int) -> None:
            self.events.publish("import_progress", model=name, done=done, total=total)
            if progress is not None:
                progress(done, total)
        return report

    def _imported(self, name: str) -> None:
        """A model just arrived (imported or downloaded): forget what was known of an earlier one, prepare it."""
        self.loads.forget(name)
        with self._lock:
            self._last_eviction.pop(name, None)
        self._bump(name)
        self._prepared.forget(name)
        self._prepare([name])

    def _local(self, name: str, cancelled: Callable[[], bool] | None = None):
        """The model's SSD entry; a model that only a cluster peer holds or a --repository lists is
        downloaded first (concurrent requests share the download; `models` lists it as importing)."""
        if name not in self.ssd and self.repositories.can_fetch(name):
            try:
                self.repositories.fetch(name, cancelled=cancelled, progress=self._import_progress(name, None))
            except ModelExistsError:
                pass   # imported meanwhile (or importing: get() says so)
            else:
                self._imported(name)
        return self.ssd.get(name)

    def _model_info(self, name: str) -> dict:
        """One model as `models` reports it, from the tiers. Sizes: ssd_bytes on disk,
        dram_bytes of pool chunks its DRAM copy takes, device_bytes its instance takes
        (None where it is not); size_bytes = ssd_bytes, for older clients."""
        e = self.ssd.get(name)
        slot = self.device.get(name)
        on_device = slot is not None and slot.instance is not None
        loading = name in self.loads
        failure = self.loads.failure(name)
        dram_bytes = self.dram.bytes_of(name) if self.dram is not None else None
        with self._lock:
            last = self._last_eviction.get(name)
            since = self._since.get(name, e.imported_at)
        state = derive_state(broken=e.error is not None, loading=loading or (slot is not None and not on_device),
                             on_device=on_device, stopping=self.device.stopping(name),
                             failed=failure is not None and failure["permanent"], in_dram=dram_bytes is not None)
        tiers = [Tier.SSD.value] + ([Tier.DRAM.value] if dram_bytes is not None else []) + \
            ([Tier.DEVICE.value] if on_device else [])
        return {"name": name, "state": state.value, "state_since": since, "tiers": tiers,
                "ssd_bytes": e.nbytes, "dram_bytes": dram_bytes, "device_bytes": slot.nbytes if on_device else None,
                "size_bytes": e.nbytes, "checkpoint_bytes": e.checkpoint_bytes,
                "device": self.config.device if on_device else None,
                "reason": last["reason"] if last else None, "last_evicted": dict(last) if last else None,
                "error": (failure["error"] if failure else None) or e.error,
                "pinned": e.pinned, "last_used": max(e.last_used, slot.last_used if slot else 0.0),
                "imported_at": e.imported_at, "source": e.source,
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
                        "ssd_bytes": None, "dram_bytes": None, "device_bytes": None,
                        "state": "importing", "state_since": job["started_at"], "device": None, "reason": None,
                        "last_evicted": None, "error": None, "pinned": False, "last_used": None,
                        "imported_at": None, "source": job["source"], "import": job})
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
        self._bump()

    def unpin(self, name: str) -> None:
        self._check_open()
        self.ssd.set_pinned(name, False)
        self._bump()

    # --- loading ----------------------------------------------------------------------------
    def load(self, name: str, keep_alive: float | None = None, fetch: bool = True) -> dict:
        """Makes sure `name` has a ready instance; keep_alive (seconds; negative = forever)
        sets how long it stays once idle. `already_loaded` says it had one."""
        self._check_open()
        ka = self._keep_alive(keep_alive)
        self._local(name) if fetch else self.ssd.get(name)   # fetch=False: only what is here (migration)
        got = self._acquire(name, ka)
        self.device.unlease(name, ka)  # no request runs on it: its keep_alive starts now
        self._bump()
        self._wake.set()
        info = self._model_info(name)
        info.update(load_tier=got.tier, load_s=got.load_s, room_wait_s=got.room_wait_s,
                    already_loaded=got.already_loaded, expires_at=self._expires(name))
        return info

    def _keep_alive(self, value: float | None) -> float:
        try:
            return policy.keep_alive_or_default(value, self.config.keep_alive_s)
        except (TypeError, ValueError) as e:
            raise InvalidRequestError(f"keep_alive: {e}") from e

    def _expires(self, name: str) -> float | None:
        slot = self.device.get(name)
        return slot.expires_at if slot else None

    def _acquire(self, name: str, keep_alive_s: float, cancelled: Callable[[], bool] | None = None) -> Acquired:
        return self.loads.acquire(name, keep_alive_s, cancelled, check_open=self._check_open)

    def _on_loaded(self, name: str, inst: Instance, tier: str, load_s: float) -> None:
        self._prepared.keep_tokenizer(name, unwrap_tokenizer(inst.tokenizer))
        self.ssd.touch(name)
        log.info("%s ready on %s from %s in %.3f s", name, self.config.device, tier, load_s)

    def _on_load_failed(self, name: str, err: BaseException) -> None:
        """A model that cannot load must not hold the DRAM pool."""
        if self.dram is not None:
            try:
                self.dram.evict(name, EvictReason.FAILED)
            except ModelInUseError:
                pass

    def _load_instance(self, load: PendingLoad) -> tuple[Instance, str, float]:
        name = load.name
        events = LoadEvents(self.events, name)
        entry = self.ssd.acquire(name)
        try:
            if entry.error:
                raise ModelFailedError(f"model {name!r} is unusable: {entry.error}")
            ckpt = open_checkpoint(entry.path)
            nbytes = device_bytes(ckpt, self.config.device, self.arena, self.config.compute_dtype)  # the cast size
            in_dram = self.dram is not None and self.dram.bytes_of(name) is not None
            events.started("dram" if in_dram else "ssd", entry.checkpoint_bytes, device=self.config.device,
                           device_bytes=nbytes)
            t0 = time.perf_counter()
            self.device.reserve(name, nbytes, wait_s=self._room_wait_s, cancelled=load.cancelled.is_set)
            t1 = time.perf_counter()
            load.room_wait_s = t1 - t0
            self._bump(name)
            try:
                if load.cancelled.is_set():
                    raise LoadCancelledError(f"the load of {name!r} was cancelled")
                loaded = load_instance(name, ckpt, self.config.device, dram=self.dram, arena=self.arena,
                                       verify=self.config.verify_checksums,
                                       tokenizer=self._prepared.tokenizer(name),
                                       skeleton=self._prepared.take_skeleton(name),
                                       compute_dtype=self.config.compute_dtype)
                self.bandwidths.observe(f"{loaded.tier}_device", entry.checkpoint_bytes, loaded.seconds)
                self.stats.load_finished(loaded.tier, loaded.seconds, entry.checkpoint_bytes)
                self.service_times.observe_load(name, loaded.seconds)
                inst = Instance(name, loaded.model, loaded.tokenizer, device=self.config.device,
                                nbytes=nbytes, queue_depth=self.config.queue_depth,
                                max_batch=int(getattr(self.config, "max_batch", 1)),
                                kv_budget=_DeviceKv(self.device, name))
            except BaseException:
                self.device.abort(name)
                raise
            events.finished(loaded.tier, loaded.seconds)
            return inst, loaded.tier, time.perf_counter() - t1
        except BaseException as e:
            events.failed(e)
            raise
        finally:
            events.stop()
            self.ssd.release(name)

    # --- instances --------------------------------------------------------------------------
    def _slot_info(self, s: Slot) -> dict:
        """One instance as `ps` (and status' instances) report it, with the same size
        fields as `models`."""
        inst = s.instance
        e = self.ssd.get(s.name) if s.name in self.ssd else None
        dram_bytes = self.dram.bytes_of(s.name) if self.dram is not None else None
        tiers = ([Tier.SSD.value] if e is not None else []) + ([Tier.DRAM.value] if dram_bytes is not None else []) \
            + ([Tier.DEVICE.value] if inst is not None else [])
        return {"name": s.name, "device": self.config.device, "tiers": tiers,
                "state": "loaded" if inst is not None else "loading",
                "ssd_bytes": e.nbytes if e is not None else None, "dram_bytes": dram_bytes, "device_bytes": s.nbytes,
                "size_bytes": e.nbytes if e is not None else None,
                "active_requests": inst.active if inst else 0, "queued": inst.queued if inst else 0,
                "batch_size": inst.batch_size if inst else 0, "max_batch": inst.max_batch if inst else None,
                "kv_bytes": s.kv_bytes, "kv_used_bytes": inst.kv_used_bytes if inst else 0,
                "leases": s.leases, "expires_at": s.expires_at, "loaded_at": s.loaded_at, "last_used": s.last_used,
                "load_tier": s.load_tier, "load_s": s.load_s}

    def ps(self) -> list[dict]:
        self._check_open()
        return [self._slot_info(s) for s in self.device.slots()]

    def requests(self) -> list[dict]:
        """Every running and queued request on this node's instances (sllmctl requests)."""
        self._check_open()
        return [r for s in self.device.slots() if s.instance is not None for r in s.instance.requests()]

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
        Loads the model from the fastest tier holding it if it has no instance (its stats
        say from where, how long, and in queue_s also how long it waited for device room).
        Closing the iterator cancels the request and frees its queue slot; `cancelled`
        (the client went away) stops it even while its model loads or its prompt prefills."""
        arrived = time.perf_counter()
        try:
            request = InferRequest.from_dict(req) if isinstance(req, dict) else req.validate()
            self._check_open()
            # an unknown model fails here, before any streaming; one a repository lists is downloaded
            self._local(request.model, cancelled.is_set if cancelled is not None else None)
        except Exception as e:
            self.stats.request_ended(self._model_label(req), outcome_of(e))
            raise
        return self._infer(request, arrived, cancelled)

    def resume(self, state: RequestState | dict, cancelled: threading.Event | None = None) -> Iterator[dict]:
        """Continues a request from its state (live migration's destination): loads the model like
        infer, then the instance carries on inside its running batch, streaming only what comes
        after `state`. The done event's stats say `resumed_at` (the output tokens it came with)."""
        arrived = time.perf_counter()
        try:
            st = RequestState.from_dict(state) if isinstance(state, dict) else state
            self._check_open()
            self._local(st.model, cancelled.is_set if cancelled is not None else None)
        except Exception as e:
            self.stats.request_ended(self._model_label(state), outcome_of(e))
            raise
        req = InferRequest(st.model, prompt="", raw=True, sampling=st.sampling, request_id=st.request_id)
        return self._infer(req, arrived, cancelled, resume_from=st)

    def park(self, model: str, request_id: str, ids: list[int], timeout: float = 60.0) -> dict:
        """Live migration's round here (the destination): prefills a request's tokens so far into
        a cache its resume will start from (Instance.park). The model must be loaded (prepare)."""
        self._check_open()
        slot = self.device.get(model)
        if slot is None or slot.instance is None:
            raise InvalidRequestError(f"model {model!r} is not loaded on this node; prepare it first")
        return slot.instance.park(request_id, ids, timeout)

    def find_request(self, request_id: str):
        """(instance, handle) of the running or queued request `request_id` here, or None."""
        self._check_open()
        for s in self.device.slots():
            if s.instance is not None:
                handle = s.instance.find(request_id)
                if handle is not None:
                    return s.instance, handle
        return None

    def _model_label(self, req) -> str:
        """A request's model as a metrics label: a model of the store, else UNKNOWN_MODEL (bounded)."""
        name = req.get("model") if isinstance(req, dict) else getattr(req, "model", None)
        return name if isinstance(name, str) and name in self.ssd else UNKNOWN_MODEL

    def _infer(self, req: InferRequest, arrived: float, cancelled: threading.Event | None = None,
               resume_from: RequestState | None = None) -> Iterator[dict]:
        """_run's events, the request counted once when it ends (self.stats): ok at its done event
        (its tokens, its time to first token unless resumed), migrated when it moved away (the
        tokens it streamed here, and its first token's time when that came here), else its
        error's code (cancelled when its consumer closed the stream)."""
        got: dict = {}  # _run says where the model came from
        events = self._run(req, arrived, cancelled, resume_from, got)
        outcome: str | None = None
        streamed = 0
        first_at: float | None = None
        try:
            for event in events:
                kind = event.get("type")
                if kind == "token":
                    streamed += 1
                    if first_at is None:
                        first_at = time.perf_counter()
                elif kind == "done" and outcome is None:
                    outcome = "ok"
                    stats = event.get("stats") or {}
                    self.stats.request_ended(
                        req.model, outcome, prompt_tokens=int(stats.get("prompt_tokens") or 0),
                        generation_tokens=int(stats.get("tokens") or 0), load_tier=stats.get("load_tier"),
                        ttft_s=None if resume_from is not None else stats.get("ttft_s"))
                elif kind == "migrated" and outcome is None:
                    outcome = "migrated"
                    first = first_at is not None and resume_from is None
                    self.stats.request_ended(req.model, outcome, generation_tokens=streamed,
                                             ttft_s=first_at - arrived if first else None,
                                             load_tier=got.get("load_tier"))
                yield event
        except BaseException as e:
            if outcome is None:
                outcome = outcome_of(e)
                self.stats.request_ended(req.model, outcome, generation_tokens=streamed)
            raise
        finally:
            events.close()  # its cleanup (leases, keep_alive 0) before the caller hears the end
            if outcome is None:  # it ended without a final event
                self.stats.request_ended(req.model, "internal", generation_tokens=streamed)

    def _run(self, req: InferRequest, arrived: float, cancelled: threading.Event | None = None,
             resume_from: RequestState | None = None, info: dict | None = None) -> Iterator[dict]:
        ka = self._keep_alive(req.keep_alive)
        got = self._acquire(req.model, ka, cancelled.is_set if cancelled is not None else None)
        if info is not None:
            info["load_tier"] = got.tier
        self._bump()
        handle = None
        seen: dict[str, int] = {}  # event kinds streamed: request_finished's outcome and tokens
        self.events.publish("request_started", id=req.request_id, model=req.model, load_tier=got.tier,
                            resumed=resume_from is not None)
        try:
            if resume_from is not None:
                handle = got.instance.resume(resume_from, arrived_at=arrived, cancelled=cancelled)
            else:
                handle = got.instance.submit(req, arrived_at=arrived, cancelled=cancelled)  # `cancelled` stops a prefill
            try:
                for event in handle:
                    if event.get("type") == "done":
                        stats = event["stats"]
                        stats.update(load_s=got.load_s, load_tier=got.tier, room_wait_s=got.room_wait_s)
                        stats["queue_s"] = (stats.get("queue_s") or 0.0) + got.room_wait_s
                        self.service_times.observe_request(req.model, stats)
                    kind = event.get("type")
                    seen[kind] = seen.get(kind, 0) + 1
                    yield event
            except (CancelledError, InstanceClosedError) as e:
                if self._closed:  # the daemon stopped it: the same answer as a request that arrives now
                    raise ShuttingDownError("sllmd is shutting down; the request was stopped") from e
                raise
        finally:
            error = sys.exc_info()[1]  # what ends the request, if not its done event
            if handle is not None and not handle.done.is_set():
                handle.cancel()
            self.device.unlease(req.model, ka)
            self.ssd.touch(req.model)
            if ka == 0:
                self.device.evict_expired()  # "unload after the request", once nothing else runs on it
            self._bump()
            self._wake.set()
            self._request_finished(req, seen, error)

    def _request_finished(self, req: InferRequest, seen: dict[str, int], error: BaseException | None) -> None:
        outcome = ("ok" if seen.get("done") else "migrated" if seen.get("migrated") else
                   "cancelled" if error is None or isinstance(error, GeneratorExit) else
                   getattr(error, "code", "internal"))
        self.events.publish("request_finished", id=req.request_id, model=req.model, outcome=outcome,
                            tokens=seen.get("token", 0))

    # --- status -----------------------------------------------------------------------------------
    def model_states(self) -> dict[str, int]:
        """How many models are in each state (imports in flight as "importing"), for /metrics."""
        counts: dict[str, int] = {}
        for m in self.models():
            counts[m["state"]] = counts.get(m["state"], 0) + 1
        return counts

    def status(self) -> dict:
        """The node at a glance. `loads` counts finished loads by outcome: ok, failed (the
        model could not be loaded: see its error in `models`), busy (no device room within
        room_wait) and cancelled (every waiter left, or shutdown)."""
        self._check_open()
        dram = self.dram.stats() if self.dram is not None else {"used_bytes": 0, "capacity_bytes": 0, "models": 0}
        dram.pop("pool", None)
        pool = self.pool.stats() if self.pool is not None else None
        if pool is not None and self._prefault is not None:
            pool["prefault"] = self._prefault.stats()
        loads = self.loads.counts()
        return {
            "uptime_s": time.time() - self._started_at, "started_at": self._started_at,
            "device": self.config.device, "version": self.version,
            "tiers": {"ssd": self.ssd.stats(), "dram": dram, "device": self.device.stats()},
            "loader": pool_mod.counters(),
            "loads": loads,
            "pool": pool,
            "arena": ({"capacity_bytes": self.arena.capacity, "used_bytes": self.arena.used}
                      if self.arena is not None else None),
            "instances": [self._slot_info(s) for s in self.device.slots()],
            "models": len(self.ssd.entries()),
            "evictions": list(self._evictions),
        }
