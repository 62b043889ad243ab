"""One model's download from a repository: parallel, verified, resumable.

    <work>/
      progress.json   which blocks of which file have landed and been verified, for which
                      version of the model (its manifest's SHA-256); replaced every 0.5 s
      checkpoint/     the model's files at their full length, sparse until filled

The manifest comes first (whole, its SHA-256 checked against the index): its per-block
CRC-32C values let every block of a data file be checked the moment it lands, before it is
written. The rest is cut into pieces of whole blocks, fetched by `connections` workers as
Range requests over kept-alive connections; each file's SHA-256 is computed by a thread
that follows the file's verified prefix (hashing overlaps the download) and compared at
the end. A stall or a 5xx is retried from the first block not yet landed, with backoff;
`retries` failures in a row without progress fail the download with the last reason.

A killed process leaves the sparse files and a progress record at most 0.5 s old: the next
run re-reads the blocks it lists (their CRCs, cheaply; a block lost to a power cut is simply
fetched again), and fetches only the rest. Files without block checksums (the JSON files,
tokenizers: small) are always fetched again whole.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import _native
from ..errors import CancelledError, CorruptCheckpointError, RepositoryError, StoreFullError
from ..store.format import MANIFEST_FILE, read_manifest
from ..store.writer import fsync_dir
from .index import ModelEntry, RemoteFile
from .remote import Remote, Retryable

log = logging.getLogger(__name__)

RECORD = "progress.json"
CHECKPOINT = "checkpoint"
BLOCK = 1 << 20  # the unit of a file without block checksums
PIECE_BYTES = 16 << 20  # one Range request
SAVE_EVERY_S = 0.5
BACKOFF_S = 0.25  # doubled after each failure, at most MAX_BACKOFF_S
MAX_BACKOFF_S = 4.0

Progress = Callable[[int, int], None]


class _Stop(Exception):
    """Another worker failed, or the download was cancelled: this one stops at once."""


@dataclass
class _File:
    remote: RemoteFile
    block_size: int
    crcs: tuple[int, ...]  # empty: verified by the file's SHA-256 only
    done: bytearray = field(default_factory=bytearray)  # 1 per landed (and verified) block
    fd: int = -1
    hashed: str | None = None

    @property
    def blocks(self) -> int:
        return -(-self.remote.size // self.block_size)

    def block_len(self, i: int) -> int:
        return min(self.block_size, self.remote.size - i * self.block_size)

    def frontier(self) -> int:
        """Bytes of the file's prefix that have landed."""
        i = self.done.find(0)
        return self.remote.size if i < 0 else i * self.block_size


def _runs(done: bytearray) -> list[list[int]]:
    out, i = [], 0
    while (i := done.find(1, i)) >= 0:
        j = done.find(0, i)
        j = len(done) if j < 0 else j
        out.append([i, j])
        i = j
    return out


class Download:
    """download(remote, entry, work).run() -> the verified checkpoint directory under `work`.

    remote: the model's directory (Remote.child of the repository); progress(done, total)
    hears bytes landed (those of an earlier run included); cancelled() stops it within one
    network read (CancelledError)."""

    def __init__(self, remote: Remote, entry: ModelEntry, work: Path, *, connections: int = 8, retries: int = 5,
                 progress: Progress | None = None, cancelled: Callable[[], bool] = lambda: False,
                 piece_bytes: int = PIECE_BYTES):
        self.remote, self.entry, self.work = remote, entry, Path(work)
        self.connections, self.retries, self.piece_bytes = connections, retries, piece_bytes
        self.progress, self.cancelled = progress, cancelled
        self.ckpt = self.work / CHECKPOINT
        self.total = entry.size_bytes
        self.landed = 0  # bytes verified and written, this run and earlier ones
        self.fetched = 0  # bytes that came over the wire in this run
        self.resumed_bytes = 0
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._error: BaseException | None = None
        self._files: list[_File] = []
        self._identity = {"source": remote.url, "manifest_sha256": entry.file(MANIFEST_FILE).sha256}

    # --- the record ---------------------------------------------------------------------
    def _load_record(self) -> dict[str, list[list[int]]]:
        try:
            raw = json.loads((self.work / RECORD).read_text())
        except (OSError, ValueError):
            raw = None
        if isinstance(raw, dict) and all(raw.get(k) == v for k, v in self._identity.items()) \
                and isinstance(raw.get("files"), dict):
            return raw["files"]
        if self.work.exists():  # another version of the model, or no record: start afresh
            shutil.rmtree(self.work)
        return {}

    def _save_record(self) -> None:
        with self._lock:
            files = {f.remote.path: _runs(f.done) for f in self._files if f.crcs}
        tmp = self.work / f".{RECORD}.tmp"
        tmp.write_text(json.dumps({**self._identity, "files": files}))
        os.replace(tmp, self.work / RECORD)  # not fsync'd: a lost record only costs a refetch

    # --- the run -----------------------------------------------------------------------
    def run(self) -> Path:
        t0 = time.monotonic()
        record = self._load_record()
        self.ckpt.mkdir(parents=True, exist_ok=True)
        try:
            manifest = self._fetch_manifest()
            crcs = {p.file: p.crcs for p in manifest.partitions} if manifest.checksum else {}
            for rf in self.entry.files:
                if rf.path == MANIFEST_FILE:
                    continue
                c = crcs.get(rf.path, ())
                f = _File(rf, manifest.block_size if c else BLOCK, c)
                if c and len(c) != f.blocks:
                    raise RepositoryError(f"{self.remote.url}/{rf.path}: the index says {rf.size} bytes, "
                                          f"the manifest has {len(c)} blocks of {manifest.block_size}")
                f.done = bytearray(f.blocks)
                self._open(f, record.get(rf.path) if c else None)
                self._files.append(f)
            self._report()
            self._transfer()
            self._finish()
        except OSError as e:
            if e.errno == 28:  # ENOSPC
                raise StoreFullError(f"the disk under {self.work} is full: {e}") from e
            raise
        finally:
            for f in self._files:
                if f.fd >= 0:
                    os.close(f.fd)
                    f.fd = -1
        log.info("downloaded %s (%d bytes, %d fetched, %d resumed) in %.2f s", self.remote.url, self.total,
                 self.fetched, self.resumed_bytes, time.monotonic() - t0)
        return self.ckpt

    def _check(self) -> None:
        if self._error is not None:
            raise _Stop()
        if self.cancelled():
            raise CancelledError("the download was cancelled")

    def _fetch_manifest(self):
        rf = self.entry.file(MANIFEST_FILE)
        data = self._retrying(lambda: self.remote.get(rf.path), f"{self.remote.url}/{rf.path}")
        self._verify_whole(rf, data)
        (self.ckpt / MANIFEST_FILE).write_bytes(data)
        self.landed += len(data)
        try:
            return read_manifest(self.ckpt)
        except CorruptCheckpointError as e:
            raise CorruptCheckpointError(f"{self.remote.url}/{MANIFEST_FILE}: {e}") from None

    def _verify_whole(self, rf: RemoteFile, data: bytes) -> None:
        if len(data) != rf.size or hashlib.sha256(data).hexdigest() != rf.sha256:
            raise CorruptCheckpointError(f"{self.remote.url}/{rf.path}: offset 0: {len(data)} bytes that do not "
                                         f"match the index's size ({rf.size}) and SHA-256")

    def _open(self, f: _File, runs: list | None) -> None:
        """Opens the file at its full length (sparse); trusts the record's blocks whose CRCs match."""
        path = self.ckpt / f.remote.path
        path.parent.mkdir(parents=True, exist_ok=True)
        f.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if os.fstat(f.fd).st_size != f.remote.size:
            os.ftruncate(f.fd, f.remote.size)
            runs = None
        for lo, hi in runs or []:
            for i in range(max(0, lo), min(hi, f.blocks)):
                n = f.block_len(i)
                if _native.crc32c(os.pread(f.fd, n, i * f.block_size), 0) == f.crcs[i]:
                    f.done[i] = 1
                    self.landed += n
                    self.resumed_bytes += n

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(self.landed, self.total)

    def _pieces(self) -> list[tuple[_File, int, int]]:
        """(file, first block, end block) runs of blocks still missing, in file order."""
        out = []
        for f in self._files:
            per = max(1, self.piece_bytes // f.block_size)
            for lo, hi in _runs(bytearray(1 - b for b in f.done)):
                out += [(f, i, min(hi, i + per)) for i in range(lo, hi, per)]
        return out

    def _transfer(self) -> None:
        pieces = self._pieces()
        stop_saving = threading.Event()
        workers = [threading.Thread(target=self._worker, args=(pieces,), name=f"sllm-dl-{i}", daemon=True)
                   for i in range(min(self.connections, max(1, len(pieces))))]
        hashers = [threading.Thread(target=self._hasher, args=(f,), name="sllm-dl-hash", daemon=True)
                   for f in self._files]
        saver = threading.Thread(target=self._saver, args=(stop_saving,), name="sllm-dl-record", daemon=True)
        for t in (*workers, *hashers, saver):
            t.start()
        try:
            for t in workers:
                while t.is_alive():
                    t.join(0.1)
                    if self.cancelled() and self._error is None:
                        with self._cv:
                            self._error = CancelledError("the download was cancelled")
                            self._cv.notify_all()
        finally:
            if self._error is not None:
                with self._cv:
                    self._cv.notify_all()
            for t in hashers:
                t.join()
            stop_saving.set()
            saver.join()
            self._save_record()
        if self._error is not None:
            raise self._error

    def _fail(self, e: BaseException) -> None:
        with self._cv:
            if self._error is None:
                self._error = e
            self._cv.notify_all()

    def _saver(self, stop: threading.Event) -> None:
        while not stop.wait(SAVE_EVERY_S):
            try:
                self._save_record()
            except OSError as e:
                log.debug("could not save the download record: %s", e)

    def _worker(self, pieces: list) -> None:
        try:
            while True:
                with self._lock:
                    if not pieces or self._error is not None:
                        return
                    f, lo, hi = pieces.pop(0)
                self._piece(f, lo, hi)
        except _Stop:
            pass
        except BaseException as e:  # noqa: BLE001 - the first failure ends the download, with its reason
            self._fail(e)

    def _piece(self, f: _File, lo: int, hi: int) -> None:
        """Fetches blocks [lo, hi) of f; a retry starts at the first block not yet landed."""
        url = f"{self.remote.url}/{f.remote.path}"
        failures, delay = 0, BACKOFF_S
        nxt = lo
        while nxt < hi:
            self._check()
            pending = bytearray()  # the start of a block split across network reads

            def land(block: memoryview) -> None:
                nonlocal nxt
                n = len(block)
                if f.crcs:
                    got = _native.crc32c(block, 0)
                    if got != f.crcs[nxt]:
                        raise CorruptCheckpointError(
                            f"{url}: offset {nxt * f.block_size}: checksum mismatch in the {n}-byte block "
                            f"(crc32c {got:08x}, the manifest says {f.crcs[nxt]:08x}); nothing was imported")
                os.pwrite(f.fd, block, nxt * f.block_size)
                with self._cv:
                    f.done[nxt] = 1
                    self.landed += n
                    self._cv.notify_all()
                nxt += 1
                self._report()

            def sink(data: memoryview) -> None:
                self._check()
                with self._lock:
                    self.fetched += len(data)
                pos = 0
                if pending:  # complete the split block first
                    take = min(len(data), f.block_len(nxt) - len(pending))
                    pending.extend(data[:take])
                    pos = take
                    if len(pending) < f.block_len(nxt):
                        return
                    view = memoryview(pending)
                    land(view)
                    view.release()  # before the buffer can shrink
                    pending.clear()
                while nxt < hi and len(data) - pos >= (n := f.block_len(nxt)):  # whole blocks: no copy
                    land(data[pos:pos + n])
                    pos += n
                if pos < len(data):
                    pending.extend(data[pos:])

            before = nxt
            try:
                start = nxt * f.block_size
                self.remote.read_range(f.remote.path, start, min(f.remote.size, hi * f.block_size), sink)
                if nxt < hi:
                    raise Retryable(f"GET {url}: the range ended early")
            except Retryable as e:
                failures = 1 if nxt > before else failures + 1
                if failures >= self.retries:
                    raise RepositoryError(f"{e}; gave up after {failures} attempts") from None
                log.info("%s; retrying in %.2f s (attempt %d of %d)", e, delay, failures + 1, self.retries)
                self._sleep(delay)
                delay = BACKOFF_S if nxt > before else min(MAX_BACKOFF_S, delay * 2)

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._check()
            time.sleep(min(0.05, deadline - time.monotonic()))

    def _retrying(self, fn, what: str):
        delay = BACKOFF_S
        for attempt in range(1, self.retries + 1):
            self._check()
            try:
                return fn()
            except Retryable as e:
                if attempt == self.retries:
                    raise RepositoryError(f"{e}; gave up after {attempt} attempts") from None
                log.info("%s; retrying in %.2f s", e, delay)
                self._sleep(delay)
                delay = min(MAX_BACKOFF_S, delay * 2)
        raise AssertionError(what)

    def _hasher(self, f: _File) -> None:
        """SHA-256 of f, following its landed prefix (so hashing overlaps the download)."""
        h = hashlib.sha256()
        pos = 0
        try:
            while pos < f.remote.size:
                with self._cv:
                    while (front := f.frontier()) <= pos and self._error is None:
                        self._cv.wait(0.5)
                    if self._error is not None:
                        return
                while pos < front:
                    data = os.pread(f.fd, min(8 << 20, front - pos), pos)
                    h.update(data)
                    pos += len(data)
            f.hashed = h.hexdigest()
        except BaseException as e:  # noqa: BLE001
            self._fail(e)

    def _finish(self) -> None:
        for f in self._files:
            if f.hashed != f.remote.sha256:
                raise CorruptCheckpointError(f"{self.remote.url}/{f.remote.path}: offset 0: its SHA-256 over "
                                             f"{f.remote.size} bytes is not the index's; nothing was imported")
            os.fsync(f.fd)
        with open(self.ckpt / MANIFEST_FILE, "rb") as m:
            os.fsync(m.fileno())
        for d in {self.ckpt, *((self.ckpt / f.remote.path).parent for f in self._files)}:
            fsync_dir(d)
