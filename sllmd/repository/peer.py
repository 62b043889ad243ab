"""Peer transfer: a cluster member that holds a checkpoint serves it like a repository.

    fetching node                                   holding node (PeerServer)
    Fetcher ── peer_files(model) ─────────────────► serve_files: its files, sizes, SHA-256
            ── peer_fetch(model, path, off, len)* ► serve_read: the bytes (at most 8 MiB a call),
                                                      in a ZeroMQ frame of their own (cluster.peer_data)

over the peer socket (CurveZMQ, members only). PeerRemote makes those calls look like a
repository's Remote, so the download is the same Download: parallel pieces, every block's
CRC-32C as it lands, every file's SHA-256 at the end, resumable, reserved against the SSD
capacity first. The SHA-256 listing of a copy is computed once per import of it and kept.
"""
from __future__ import annotations

import os
import threading
from typing import Any

from ..cluster.peer_data import fetch
from ..errors import (BusyError, DaemonTimeoutError, DaemonUnreachableError, PeerFailedError, RepositoryError,
                      ShuttingDownError, SllmError, UnknownTypeError)
from .index import ModelEntry, entry_for
from .index import _entry as parse_entry
from .remote import Remote, Retryable, Sink

_listings: dict[tuple[str, str, float], list[dict]] = {}  # (store, model, imported_at) -> files
_listings_lock = threading.Lock()
RETRYABLE = (BusyError, DaemonTimeoutError, DaemonUnreachableError, PeerFailedError, ShuttingDownError)


def serve_files(ssd, model: str) -> list[dict]:
    entry = ssd.acquire(model)  # ModelNotFoundError when it is not here; kept from eviction meanwhile
    try:
        key = (os.fspath(ssd.root), model, entry.imported_at)
        with _listings_lock:
            files = _listings.get(key)
        if files is None:
            files = [f.to_json() for f in entry_for(entry.path, model, model).files]
            with _listings_lock:
                _listings[key] = files
        return files
    finally:
        ssd.release(model)


def serve_read(ssd, model: str, path: str, offset: int, length: int) -> bytes:
    if path not in {f["path"] for f in serve_files(ssd, model)}:  # nothing outside the checkpoint's files
        raise RepositoryError(f"model {model!r} here has no file {path!r}")
    entry = ssd.acquire(model)
    try:
        with open(entry.path / path, "rb") as f:
            return os.pread(f.fileno(), length, offset)
    finally:
        ssd.release(model)


class PeerRemote(Remote):
    """A peer's copy of one model, read over the peer socket (PeerClient.files / read)."""

    def __init__(self, client: Any, node: str, model: str, chunk: int = 8 << 20):
        self.client, self.node, self.model, self.chunk = client, node, model, chunk
        self.url = f"peer://{node}/{model}"
        self._sizes: dict[str, int] | None = None  # the listing, asked once
        self._old_peer = False                     # it knows peer_read only

    def entry(self) -> ModelEntry:
        """The peer's listing, validated as an index entry is (plain relative paths, sizes, digests)."""
        files = self._call(self.client.files, self.model)
        try:
            entry = parse_entry(self.model, {"path": self.model, "files": files})
            self._sizes = {f.path: f.size for f in entry.files}
            return entry
        except (ValueError, TypeError) as e:
            raise RepositoryError(f"{self.url}: a malformed file listing: {e}") from None

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except RETRYABLE as e:
            raise Retryable(f"{self.url}: {e.code}: {e}") from None
        except SllmError as e:
            raise RepositoryError(f"{self.url}: {e}") from None

    def _read(self, rel: str, offset: int, length: int):
        """peer_fetch (the bytes in a frame of their own, sllmd.cluster.peer_data); peer_read
        with a peer too old to know it."""
        if not self._old_peer:
            try:
                return fetch(self.client, self.model, rel, offset, length)
            except UnknownTypeError:
                self._old_peer = True
        return self.client.read(self.model, rel, offset, length)

    def get(self, rel: str, missing_ok: bool = False) -> bytes | None:
        if self._sizes is None:
            self._sizes = {f["path"]: f["size"] for f in self._call(self.client.files, self.model)}
        size = self._sizes.get(rel)
        if size is None:
            if missing_ok:
                return None
            raise RepositoryError(f"{self.url}/{rel}: no such file")
        out = bytearray()
        self.read_range(rel, 0, size, out.extend)
        return bytes(out)

    def read_range(self, rel: str, start: int, end: int, sink: Sink) -> None:
        pos = start
        while pos < end:
            data = self._call(self._read, rel, pos, min(self.chunk, end - pos))
            if not data:
                raise RepositoryError(f"{self.url}/{rel}: ends at byte {pos}")
            sink(memoryview(data))
            pos += len(data)
