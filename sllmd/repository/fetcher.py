"""The node's repositories: which one lists a model, and one shared download per model.

    Node.infer / load (a model in no local tier)   ──► Fetcher.fetch(name)
    sllmctl import NAME URL (a repository, or a model in one) ──► Fetcher.fetch(name, url=URL)
        │ lookup: GET <repository>/index.json of each --repository, in order
        │ SsdStore.begin_import: the model's bytes reserved against --ssd-capacity (a full
        │     store refuses here, before the first byte), listed as importing
        │ Download(...).run() into <store>/downloads/NAME (resumes what a killed run left)
        └ SsdStore.finish_import: validated, renamed into models/NAME

Concurrent callers for one name wait on the same download; each leaves when it is cancelled,
and the download is cancelled when the last one leaves. A cancelled or refused download
(corrupt, disk full, `sllmctl rm`) removes its partial files; one stopped by shutdown or a
failing server keeps them for the next attempt to resume.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import unquote, urlsplit

from ..errors import CancelledError, CorruptCheckpointError, ModelNotFoundError, RepositoryError, StoreFullError
from .download import BACKOFF_S, MAX_BACKOFF_S, Download
from .index import INDEX, ModelEntry, parse_index
from .remote import Remote, Retryable, open_remote

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
Notify = Callable[[str, dict], None]
EVENT_EVERY_S = 0.5


@dataclass
class _Waiter:
    progress: Progress | None
    notify: Notify | None
    gone: bool = False


@dataclass
class _Shared:
    """One download in flight and everyone waiting for it."""

    name: str
    repo: str  # the repository's URL, or peer://NODE
    entry: ModelEntry
    open: Callable[[], Remote]  # the model's directory there
    kind: str = "repo"  # or "peer": which bandwidth the download measures
    waiters: list[_Waiter] = field(default_factory=list)
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    result: object = None
    error: BaseException | None = None
    last_event: float = 0.0
    stats: dict = field(default_factory=dict)


class Fetcher:
    def __init__(self, config, ssd, bandwidths=None, stopping: Callable[[], bool] = lambda: False):
        self.repositories: tuple[str, ...] = tuple(getattr(config, "repositories", ()) or ())
        self.connections = int(getattr(config, "download_connections", 4))
        self.timeout_s = float(getattr(config, "download_timeout_s", 30.0))
        self.retries = int(getattr(config, "download_retries", 5))
        self.ssd, self.bandwidths, self.stopping = ssd, bandwidths, stopping
        self._lock = threading.Lock()
        self._jobs: dict[str, _Shared] = {}
        self._indexes: dict[str, tuple[float, dict[str, ModelEntry]]] = {}   # url -> (when read, models)
        # peer transfer (set by the cluster): the alive peers holding a model, as (node, PeerClient)
        self.peers: Callable[[str], list[tuple[str, object]]] | None = None

    # --- where a model is ---------------------------------------------------------------
    def _remote(self, url: str) -> Remote:
        return open_remote(url, self.connections, self.timeout_s)

    def _index(self, url: str) -> dict[str, ModelEntry] | None:
        """The repository's models; None when `url` has no index.json."""
        delay = BACKOFF_S
        with self._remote(url) as r:
            for attempt in range(1, self.retries + 1):
                try:
                    data = r.get(INDEX, missing_ok=True)
                    break
                except Retryable as e:
                    if attempt == self.retries:
                        raise RepositoryError(f"repository {url}: {e}; gave up after {attempt} attempts") from None
                    log.info("repository %s: %s; retrying in %.2f s", url, e, delay)
                    time.sleep(delay)
                    delay = min(MAX_BACKOFF_S, delay * 2)
        if data is None or _is_tensor_index(data):   # nothing, or a checkpoint's own index.json: a model's directory
            return None
        return parse_index(data, f"{url}/{INDEX}")

    def lookup(self, name: str, max_age_s: float = 0.0) -> tuple[str, ModelEntry] | None:
        """(repository URL, entry) of the first configured repository that lists `name`.
        max_age_s: an index read that long ago will do (placement asks per request; a fetch
        reads it fresh)."""
        for url in self.repositories:
            try:
                models = self._cached_index(url, max_age_s)
            except RepositoryError as e:
                log.warning("repository %s is unusable: %s", url, e)
                continue
            if name in models:
                return url, models[name]
        return None

    def _cached_index(self, url: str, max_age_s: float) -> dict[str, ModelEntry]:
        now = time.monotonic()
        with self._lock:
            hit = self._indexes.get(url)
        if hit is not None and now - hit[0] <= max_age_s:
            return hit[1]
        models = self._index(url) or {}
        with self._lock:
            self._indexes[url] = (now, models)
        return models

    def resolve(self, url: str, name: str) -> tuple[str, ModelEntry]:
        """`sllmctl import NAME URL`: URL is a repository (NAME is looked up in it) or a model's
        directory inside one (its last path component names it there)."""
        url = url.rstrip("/")
        models = self._index(url)
        if models is not None:
            if name not in models:
                raise ModelNotFoundError(f"repository {url} lists no model {name!r} "
                                         f"(it lists {', '.join(sorted(models)) or 'none'})")
            return url, models[name]
        parent, _, last = url.rpartition("/")
        remote_name = unquote(last)
        within = urlsplit(url).path.strip("/") if "://" in url else url.strip("/")
        models = self._index(parent) if within else None
        if models is None:
            raise RepositoryError(f"{url}: neither a repository nor a model in one (no {INDEX} there or above)")
        if remote_name not in models:
            raise ModelNotFoundError(f"repository {parent} lists no model {remote_name!r}")
        return parent, models[remote_name]

    # --- fetching ---------------------------------------------------------------------
    def fetch(self, name: str, *, url: str | None = None, progress: Progress | None = None,
              notify: Notify | None = None, cancelled: Callable[[], bool] | None = None,
              tokenizer: bool = True, use_peers: bool = True) -> dict:
        """Downloads `name` into the SSD store (from `url`, else the first configured repository
        listing it) and publishes it; joins a download of the same name already in flight.
        Returns {"entry", "repository", "seconds", "fetched_bytes", "resumed_bytes", "shared"}.
        Without `url`, a cluster peer holding the model comes first (peer transfer); a peer that
        fails falls back to the repositories."""
        with self._lock:
            job = self._jobs.get(name)
        shared = job is not None
        if job is None:
            found = None
            if url is None and use_peers:
                found = self._from_peer(name)
            if found is None:
                repo = self.resolve(url, name) if url is not None else self.lookup(name)
                if repo is not None:
                    found = (repo[0], repo[1], self._opener(*repo), "repo")
            if found is None:
                raise ModelNotFoundError(f"no model named {name!r} in the store or in the repositories "
                                         f"({', '.join(self.repositories) or 'none configured'})")
            with self._lock:
                job = self._jobs.get(name)
                shared = job is not None
                if job is None:
                    job = self._jobs[name] = _Shared(name, *found)
                    threading.Thread(target=self._run, args=(job, tokenizer), name=f"sllm-fetch-{name}",
                                     daemon=True).start()
        me = _Waiter(progress, notify)
        with self._lock:
            job.waiters.append(me)
        try:
            while not job.done.wait(0.1):
                if cancelled is not None and cancelled():
                    raise CancelledError(f"the download of {name!r} was cancelled")
        finally:
            with self._lock:
                job.waiters.remove(me)
                if not job.waiters and not job.done.is_set():
                    job.cancel.set()  # nobody wants it any more
        if job.error is not None:
            if job.kind == "peer" and isinstance(job.error, RepositoryError) and not shared:
                log.warning("fetching %s from %s failed (%s); trying the repositories", name, job.repo, job.error)
                return self.fetch(name, progress=progress, notify=notify, cancelled=cancelled, tokenizer=tokenizer,
                                  use_peers=False)
            raise job.error
        return dict(job.stats, entry=job.result, shared=shared)

    def _opener(self, repo: str, entry: ModelEntry) -> Callable[[], Remote]:
        return lambda: self._remote(repo).child(entry.path)

    def _from_peer(self, name: str):
        """(peer://NODE, entry, opener, "peer") of the first alive peer that lists `name`, or None."""
        from .peer import PeerRemote
        for node, client in (self.peers(name) if self.peers is not None else []):
            remote = PeerRemote(client, node, name)
            try:
                entry = remote.entry()
            except (RepositoryError, Retryable) as e:
                log.info("peer %s cannot send %s: %s", node, name, e)
                continue
            return f"peer://{node}", entry, (lambda r=remote: r), "peer"
        return None

    def can_fetch(self, name: str) -> bool:
        """Whether a repository is configured or a peer holds `name`: worth a fetch."""
        return bool(self.repositories) or bool(self.peers is not None and self.peers(name))

    def downloading(self, name: str) -> bool:
        with self._lock:
            return name in self._jobs

    def _tell(self, job: _Shared, progress: tuple[int, int] | None, event: tuple[str, dict] | None) -> None:
        with self._lock:
            waiters = [w for w in job.waiters if not w.gone]
        for w in waiters:
            try:
                if progress is not None and w.progress is not None:
                    w.progress(*progress)
                if event is not None and w.notify is not None:
                    w.notify(*event)
            except Exception as e:  # a waiter's callback failing (its client left) ends only its part
                log.debug("a waiter for %s stopped listening: %s", job.name, e)
                w.gone = True

    def _run(self, job: _Shared, tokenizer: bool) -> None:
        name, entry = job.name, job.entry
        work = self.ssd.downloads_dir / name
        source = f"{job.repo}/{entry.path}" if job.kind == "repo" else f"{job.repo}/{name}"
        keep = False
        imp = None
        try:
            imp = self.ssd.begin_import(name, source, entry.size_bytes,
                                        notify=lambda ev, data: self._tell(job, None, (ev, data)))
            clock = imp.clock

            def landed(done: int, total: int) -> None:
                clock.update("downloading", done, total, "bytes")
                now = time.monotonic()
                event = None
                if done >= total or now - job.last_event >= EVENT_EVERY_S:
                    job.last_event = now
                    event = ("phase", clock.event())
                self._tell(job, (done, total), event)

            stop = lambda: job.cancel.is_set() or imp.cancel.is_set()  # noqa: E731
            t0 = time.monotonic()
            with job.open() as remote:
                dl = Download(remote, entry, work, connections=self.connections, retries=self.retries,
                              progress=landed, cancelled=stop)
                try:
                    ckpt = dl.run()
                except (RepositoryError, CancelledError):
                    keep = self.stopping() or not stop()  # shutdown or a failing server: resume later
                    raise
            seconds = time.monotonic() - t0
            if self.bandwidths is not None and dl.fetched:
                self.bandwidths.observe(f"{job.kind}_ssd", dl.fetched, seconds)
            clock.update("publishing")
            self._tell(job, None, ("phase", clock.event()))
            job.result = self.ssd.finish_import(imp, ckpt, tokenizer=tokenizer,
                                                notify=lambda ev, data: self._tell(job, None, (ev, data)))
            job.stats = {"repository": job.repo, "seconds": seconds, "fetched_bytes": dl.fetched,
                         "resumed_bytes": dl.resumed_bytes}
            log.info("%s downloaded from %s: %d bytes in %.2f s (%.0f MB/s), %d resumed", name, source,
                     dl.fetched, seconds, dl.fetched / max(seconds, 1e-9) / 1e6, dl.resumed_bytes)
        except BaseException as e:  # noqa: BLE001 - every waiter hears why
            job.error = e
            if not isinstance(e, (RepositoryError, CancelledError, CorruptCheckpointError, StoreFullError)):
                log.exception("downloading %s failed", name)
        finally:
            if not keep:   # before the import ends: whoever cancelled it finds nothing left
                shutil.rmtree(work, ignore_errors=True)
            if imp is not None:
                self.ssd.end_import(imp)
            with self._lock:
                self._jobs.pop(name, None)
            job.done.set()


def _is_tensor_index(data: bytes) -> bool:
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError):
        return False
    return isinstance(raw, dict) and "tensors" in raw and "format" not in raw


def is_repository_url(source: str) -> bool:
    """An http(s) URL, or a local path/file:// URL of a repository or a model directory in one."""
    if source.startswith(("http://", "https://")):
        return True
    from pathlib import Path
    from .index import is_repository
    path = Path(unquote(urlsplit(source).path) if source.startswith("file:") else os.path.expanduser(source))
    return is_repository(path) or is_repository(path.parent)
