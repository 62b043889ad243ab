"""The SSD tier: the local checkpoint store.

    <store>/
      lock            flock()ed by the daemon that owns the store
      catalog.json    pins and last-use times (replaced atomically)
      models/<name>/  one checkpoint per model, published by rename
      staging/        imports in progress and removals (emptied at start)
      downloads/      repository downloads in progress (kept across restarts: they resume)

The catalog is rebuilt from models/ at start; catalog.json only adds what the
directories cannot say (pins, last use). An import is written (converted or
copied) under staging/, made room for, then renamed into models/ in one step,
so a crash at any point leaves either no model or a whole one; a removal
renames the directory into staging/ before deleting it. Capacity is enforced
by evicting least recently used, unpinned models that nothing is using.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import names
from ..errors import CheckpointError, SllmError
from ..store.format import open_checkpoint
from ..store.validate import check_servable
from ..store.writer import fsync_dir
from . import policy
from sllmd.errors import (CancelledError, ModelPinnedError,
                          ModelExistsError, ModelInUseError, ModelNotFoundError, StoreFullError,
                     StoreLockedError)
from .importer import ImportJob, Notify, convert_in_child, copy_checkpoint, is_our_checkpoint  # noqa: F401
from .states import EvictReason

log = logging.getLogger(__name__)

CATALOG = "catalog.json"
Progress = Callable[[int, int], None]
EvictHook = Callable[[str, EvictReason], None]


def check_name(name: str) -> str:
    return names.check(name)


@dataclass
class SsdEntry:
    name: str
    path: Path
    nbytes: int  # bytes on disk
    checkpoint_bytes: int  # bytes of tensor data (partition files)
    pinned: bool = False
    last_used: float = 0.0
    imported_at: float = 0.0
    source: str | None = None
    error: str | None = None  # why the checkpoint is unusable, when it is

    def to_dict(self) -> dict:
        return {"name": self.name, "size_bytes": self.nbytes, "checkpoint_bytes": self.checkpoint_bytes,
                "pinned": self.pinned, "last_used": self.last_used, "imported_at": self.imported_at,
                "source": self.source, "error": self.error}


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except FileNotFoundError:
                pass
    return total


def _apply_catalog(entry: SsdEntry, meta: dict) -> None:
    """Pins, times and source from catalog.json; a value of the wrong type is ignored (with
    a warning): the directory's own facts stand, and the model stays usable."""
    def field(key: str, ok, default):
        value = meta.get(key, default)
        if value is default or ok(value):
            return value
        log.warning("catalog.json: ignoring %s=%r of model %s (not a valid value)", key, value, entry.name)
        return default

    def is_time(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1e18

    entry.pinned = field("pinned", lambda v: isinstance(v, bool), False)
    entry.last_used = float(field("last_used", is_time, entry.last_used))
    entry.imported_at = float(field("imported_at", is_time, entry.imported_at))
    entry.source = field("source", lambda v: isinstance(v, str), None)


class SsdStore:
    """The local checkpoint store. Thread-safe; long work (imports) runs outside its lock."""

    def __init__(self, root: str | os.PathLike, capacity_bytes: int | None = None,
                 on_evict: EvictHook | None = None):
        self.root = Path(root)
        self.capacity = capacity_bytes
        self.models_dir = self.root / "models"
        self.staging_dir = self.root / "staging"
        self.downloads_dir = self.root / "downloads"
        self._reserved: dict[str, int] = {}  # bytes held for imports written elsewhere (downloads)
        self.on_evict = on_evict
        self._lock = threading.RLock()
        self._entries: dict[str, SsdEntry] = {}
        self._refs: dict[str, int] = {}  # readers (loads) per model
        self._imports: dict[str, ImportJob] = {}  # imports in flight
        self._lock_fd: int | None = None
        self._dirty = False  # last-use times changed since catalog.json was written
        self.is_busy: Callable[[str], bool] = lambda name: False  # the node adds: in DRAM, on device, loading

    # --- lifecycle ------------------------------------------------------------
    def open(self) -> None:
        """Locks the store, clears leftovers of interrupted imports/removals, rebuilds the catalog."""
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        self.downloads_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLockedError(f"{self.root} is in use by another sllmd") from None
        self._lock_fd = fd
        for leftover in self.staging_dir.iterdir():
            log.info("removing leftover %s (an interrupted import or removal)", leftover)
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
        for leftover in self.models_dir.glob(".*"):  # temporaries of a writer that was killed mid-write
            log.info("removing leftover %s", leftover)
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
        meta = self._read_catalog()
        entries = {}
        for d in sorted(self.models_dir.iterdir()):
            if not d.is_dir():
                continue
            if not names.is_valid(d.name):
                log.warning("ignoring %s in the store: %r is not a valid model name", d, d.name)
                continue
            entry = self._scan(d.name, d)
            _apply_catalog(entry, meta.get(d.name, {}))
            entries[d.name] = entry
        with self._lock:
            self._entries = entries
            self._write_catalog()
        log.info("ssd store %s: %d models, %d bytes used%s", self.root, len(entries), self.used_bytes,
                 f" of {self.capacity}" if self.capacity else "")

    def close(self) -> None:
        """Cancels imports in flight (each removes what it wrote), then releases the store."""
        self.cancel_imports()
        with self._lock:
            if self._lock_fd is not None:
                self._write_catalog()
                os.close(self._lock_fd)
                self._lock_fd = None

    def _scan(self, name: str, path: Path) -> SsdEntry:
        """The entry for one model directory; whatever is wrong with it becomes its `error`
        (a bad checkpoint makes one failed model, never a daemon that cannot start)."""
        try:
            mtime = path.stat().st_mtime
        except OSError:
            mtime = 0.0
        try:
            ckpt = open_checkpoint(path)
            data = ckpt.manifest.total_bytes
            missing = [p.file for p in ckpt.manifest.partitions if not ckpt.data_path(p).is_file()]
            error = f"missing data files {missing}" if missing else None
        except (SllmError, OSError) as e:
            data, error = 0, str(e)
        except Exception as e:  # a reader bug must not stop the daemon either
            log.exception("scanning %s failed", path)
            data, error = 0, f"{type(e).__name__}: {e}"
        if error:
            log.warning("model %s in the store is unusable: %s", name, error)
        return SsdEntry(name, path, dir_bytes(path), data, last_used=mtime, imported_at=mtime, error=error)

    # --- catalog --------------------------------------------------------------
    def _read_catalog(self) -> dict[str, dict]:
        try:
            raw = json.loads((self.root / CATALOG).read_text())
            models = raw.get("models", {})
            return {k: v for k, v in models.items() if isinstance(v, dict)}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, AttributeError, TypeError) as e:
            log.warning("%s is unreadable (%s); pins and last-use times start afresh", self.root / CATALOG, e)
            return {}

    def _write_catalog(self) -> None:
        self._dirty = False
        data = {"version": 1, "models": {n: {"pinned": e.pinned, "last_used": e.last_used,
                                              "imported_at": e.imported_at, "source": e.source}
                                          for n, e in self._entries.items()}}
        tmp = self.root / f".{CATALOG}.{uuid.uuid4().hex[:8]}"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / CATALOG)

    # --- queries --------------------------------------------------------------
    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def entries(self) -> list[SsdEntry]:
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: e.name)

    def get(self, name: str) -> SsdEntry:
        with self._lock:
            try:
                return self._entries[name]
            except KeyError:
                job = self._imports.get(name)
                if job is not None:
                    raise ModelNotFoundError(f"model {name!r} is being imported ({job.describe()}); "
                                             f"it can be used once the import finishes") from None
                raise ModelNotFoundError(f"no model named {name!r} (see `sllmctl models`)") from None

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._entries

    # --- use ------------------------------------------------------------------
    def acquire(self, name: str) -> SsdEntry:
        """Marks the model as being read (it cannot be evicted or removed until release)."""
        with self._lock:
            entry = self.get(name)
            self._refs[name] = self._refs.get(name, 0) + 1
            return entry

    def release(self, name: str) -> None:
        with self._lock:
            n = self._refs.get(name, 0) - 1
            if n > 0:
                self._refs[name] = n
            else:
                self._refs.pop(name, None)

    def touch(self, name: str, now: float | None = None) -> None:
        """Records a use; written to disk by the next flush() (losing one to a crash only
        makes LRU order slightly stale)."""
        with self._lock:
            e = self._entries.get(name)
            if e is not None:
                e.last_used = time.time() if now is None else now
                self._dirty = True

    def flush(self) -> None:
        """Writes catalog.json if last-use times changed (the node calls it periodically)."""
        with self._lock:
            if self._dirty and self._lock_fd is not None:
                self._write_catalog()

    def set_pinned(self, name: str, pinned: bool) -> None:
        with self._lock:
            self.get(name).pinned = pinned
            self._write_catalog()

    def _busy(self, name: str) -> bool:
        return self._refs.get(name, 0) > 0 or self.is_busy(name)

    # --- import ---------------------------------------------------------------
    def import_model(self, name: str, source: str | os.PathLike, progress: Progress | None = None,
                     convert: Callable | None = None, notify: Notify | None = None,
                     cancelled: Callable[[], bool] | None = None, *, servable: bool = False,
                     tokenizer: bool = True) -> SsdEntry:
        """Copies our checkpoint format, or converts anything else, into the store under `name`,
        atomically. Conversions run in a child process (sllmd.tiers.importer), outside this
        process's locks, unless `convert(source, dest)` is given (it then runs here).

        notify(event, data) hears "phase" reports (what the import is doing, with elapsed
        times) and one "evicted" per model removed to make room. The import stops with
        CancelledError, leaving nothing behind, once cancelled() is true, cancel_import(name)
        is called, or the store closes. servable=True refuses (UnservableModelError) what
        could not be served; tokenizer=False accepts one without a tokenizer."""
        check_name(name)
        src = Path(source).expanduser()
        if not src.exists():
            raise CheckpointError(f"{src}: no such file or directory")
        job = ImportJob(name, os.fspath(src))
        with self._lock:
            if name in self._entries:
                raise ModelExistsError(f"a model named {name!r} already exists (remove it first: sllmctl rm {name})")
            if name in self._imports:
                raise ModelExistsError(f"a model named {name!r} is being imported ({self._imports[name].describe()}); "
                                       f"wait for it, or cancel it with `sllmctl rm {name}`")
            self._imports[name] = job

        def stop() -> bool:
            return job.cancel.is_set() or (cancelled is not None and cancelled())

        def copied(done: int, total: int) -> None:
            job.clock.update("copying", done, total, "bytes")
            if progress is not None:
                progress(done, total)

        work = self.staging_dir / f"import-{uuid.uuid4().hex[:12]}"
        staged = work / "checkpoint"
        try:
            work.mkdir(parents=True)
            if is_our_checkpoint(src):
                open_checkpoint(src)  # a corrupt source is refused naming the user's file, before any copying
                copy_checkpoint(src, staged, copied, cancelled=stop)
            elif convert is not None:
                convert(src, staged, **({"progress": progress} if progress is not None else {}))
            else:
                convert_in_child(src, staged, progress=progress, notify=notify, cancelled=stop, clock=job.clock)
            open_checkpoint(staged)  # whatever it came from, it must now be a valid checkpoint
            if servable:  # the daemon's imports: refused now, not at the first request (sllmd.store.validate)
                check_servable(staged, tokenizer=tokenizer, name=name)
            nbytes = dir_bytes(staged)
            with self._lock:
                if stop():  # checked under the lock: nothing is evicted for a cancelled import
                    raise CancelledError("the import was cancelled")
                entry, evicted = self._adopt_locked(name, staged, nbytes, os.fspath(src))
            log.info("imported %s from %s (%d bytes)", name, src, nbytes)
            for victim in evicted:
                self._tell(notify, "evicted", victim)
            return entry
        except OSError as e:
            if e.errno == 28:  # ENOSPC
                raise StoreFullError(f"the disk under {self.root} is full: {e}") from e
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
            with self._lock:
                self._imports.pop(name, None)
            job.finished.set()

    def _adopt_locked(self, name: str, staged: Path, nbytes: int, source: str) -> tuple[SsdEntry, list[dict]]:
        """Makes room for a staged checkpoint and renames it into models/ (caller holds the lock)."""
        evicted = self._make_room(nbytes, exclude={name}, reason=f"to make room for {name}")
        dest = self.models_dir / name
        os.rename(staged, dest)
        fsync_dir(self.models_dir)
        now = time.time()
        entry = self._scan(name, dest)
        entry.imported_at = entry.last_used = now
        entry.source = source
        self._entries[name] = entry
        self._imports.pop(name, None)
        self._write_catalog()
        return entry, evicted

    # --- imports written elsewhere (repository downloads) ---------------------
    def begin_import(self, name: str, source: str, nbytes: int, notify: Notify | None = None) -> ImportJob:
        """Registers an import whose bytes someone else writes (sllmd.repository) and reserves
        nbytes against the capacity now, evicting idle models if need be: a full store refuses
        (StoreFullError) before the first byte moves. End it with finish_import or end_import."""
        check_name(name)
        job = ImportJob(name, source)
        with self._lock:
            if name in self._entries:
                raise ModelExistsError(f"a model named {name!r} already exists (remove it first: sllmctl rm {name})")
            if name in self._imports:
                raise ModelExistsError(f"a model named {name!r} is being imported ({self._imports[name].describe()})")
            evicted = self._make_room(nbytes, exclude={name}, reason=f"to make room for {name}")
            self._reserved[name] = nbytes
            self._imports[name] = job
        for victim in evicted:
            self._tell(notify, "evicted", victim)
        return job

    def finish_import(self, job: ImportJob, staged: Path, *, servable: bool = True, tokenizer: bool = True,
                      notify: Notify | None = None) -> SsdEntry:
        """Validates the checkpoint staged under the store's root (same filesystem) and publishes
        it as job.name in one rename; the reservation becomes the model's size."""
        try:
            open_checkpoint(staged)
            if servable:
                check_servable(staged, tokenizer=tokenizer, name=job.name)
            nbytes = dir_bytes(staged)
            with self._lock:
                if job.cancel.is_set():
                    raise CancelledError("the import was cancelled")
                self._reserved.pop(job.name, None)
                entry, evicted = self._adopt_locked(job.name, staged, nbytes, job.source)
            log.info("imported %s from %s (%d bytes)", job.name, job.source, nbytes)
            for victim in evicted:
                self._tell(notify, "evicted", victim)
            return entry
        finally:
            self.end_import(job)

    def end_import(self, job: ImportJob) -> None:
        """Drops the job and its reservation (idempotent)."""
        with self._lock:
            if self._imports.get(job.name) is job:
                del self._imports[job.name]
                self._reserved.pop(job.name, None)
        job.finished.set()

    @staticmethod
    def _tell(notify: Notify | None, event: str, data: dict) -> None:
        """Tells the importer what happened; its going away must not undo a published import."""
        if notify is None:
            return
        try:
            notify(event, data)
        except Exception as e:
            log.debug("could not report %s %s: %s", event, data.get("name"), e)

    def importing(self) -> list[dict]:
        """The imports in flight: name, source, started_at, phase, done/total/unit, elapsed_s."""
        with self._lock:
            jobs = list(self._imports.values())
        return [j.to_dict() for j in sorted(jobs, key=lambda j: j.name)]

    def cancel_import(self, name: str, timeout: float = 30.0) -> bool:
        """Cancels the import of `name` and waits (up to timeout) until it has removed what it
        wrote; False when no import of that name is running."""
        with self._lock:
            job = self._imports.get(name)
        if job is None:
            return False
        job.cancel.set()
        if not job.finished.wait(timeout):
            log.warning("the import of %s did not stop within %.0f s", name, timeout)
        return True

    def cancel_imports(self, timeout: float = 30.0) -> None:
        with self._lock:
            jobs = list(self._imports.values())
        for job in jobs:
            job.cancel.set()
        deadline = time.monotonic() + timeout
        for job in jobs:
            if not job.finished.wait(max(0.0, deadline - time.monotonic())):
                log.warning("the import of %s did not stop in time", job.name)

    def _make_room(self, nbytes: int, exclude: set[str], reason: str = "") -> list[dict]:
        """Evicts least recently used, unpinned, idle models until nbytes fit (caller holds the
        lock); returns what it evicted (name, size_bytes, last_used, reason, why)."""
        if self.capacity is None:
            return []
        if nbytes > self.capacity:
            raise StoreFullError(f"the model needs {nbytes} bytes; the store holds at most {self.capacity}")
        cands = [policy.Candidate(e.name, e.nbytes, e.last_used, e.pinned, self._busy(e.name))
                 for e in self._entries.values()]
        reserved = sum(n for k, n in self._reserved.items() if k not in exclude)  # downloads in flight
        free = self.capacity - self.used_bytes - reserved
        victims = policy.choose_victims(cands, nbytes, free, exclude)
        if victims is None:
            held = f" ({reserved} held for downloads in flight)" if reserved else ""
            raise StoreFullError(f"the store has {max(0, free)} of {self.capacity} bytes free{held} "
                                 f"and {nbytes} are needed; the other models are pinned or in use")
        evicted = []
        for v in victims:
            e = self._entries[v]
            evicted.append({"name": v, "size_bytes": e.nbytes, "last_used": e.last_used, "pinned": False,
                            "tier": "ssd", "reason": EvictReason.LRU.value, "why": reason or "to make room",
                            "at": time.time()})
            log.warning("evicting %s from the ssd store %s (least recently used; %d bytes, --ssd-capacity %d)",
                        v, reason or "to make room", e.nbytes, self.capacity)
            self._remove_locked(v, EvictReason.LRU)
        return evicted

    # --- removal --------------------------------------------------------------
    def check_removable(self, name: str, force: bool = False) -> SsdEntry:
        """The entry, unless removing it needs `force` (it is pinned): then ModelPinnedError."""
        entry = self.get(name)
        if entry.pinned and not force:
            raise ModelPinnedError(f"model {name!r} is pinned; unpin it first (sllmctl unpin {name}) "
                                   f"or pass --force to remove it anyway")
        return entry

    def remove(self, name: str, reason: EvictReason = EvictReason.MANUAL, force: bool = False) -> None:
        """Removes the model (a pinned one only with force); an import in flight is cancelled."""
        cancelled = self.cancel_import(name)
        with self._lock:
            if cancelled and name not in self._entries:
                return
            self.check_removable(name, force)
            if self._busy(name):
                raise ModelInUseError(f"model {name!r} is in use; evict it from the faster tiers first")
            self._remove_locked(name, reason)

    def _remove_locked(self, name: str, reason: EvictReason) -> None:
        entry = self._entries.pop(name)
        self._refs.pop(name, None)
        trash = self.staging_dir / f"remove-{uuid.uuid4().hex[:12]}"
        os.rename(entry.path, trash)  # atomic: the model is gone from the catalog at once
        fsync_dir(self.models_dir)
        self._write_catalog()
        shutil.rmtree(trash, ignore_errors=True)
        log.info("removed %s from the ssd store (%s, %d bytes)", name, reason.value, entry.nbytes)
        if self.on_evict is not None:
            self.on_evict(name, reason)

    def stats(self) -> dict:
        with self._lock:
            return {"used_bytes": self.used_bytes, "capacity_bytes": self.capacity, "models": len(self._entries),
                    "root": os.fspath(self.root), "reserved_bytes": sum(self._reserved.values())}
