"""Where a repository's bytes come from: a directory (file://) or a web server (http(s)://).

Both read whole small files (`get`) and byte ranges (`read_range`, streamed into a sink as
they arrive). Over HTTP a range is one `Range: bytes=A-B` request on one of a pool of
kept-alive connections (httpx; one client per download, shared by its worker threads).
Failures worth another attempt (a stall past the read timeout, a dropped connection, a 5xx
or 429) raise Retryable; the caller decides how often (download.py). Anything else (404,
a server that ignores Range) is a RepositoryError at once.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable
from urllib.parse import quote, unquote, urlsplit

from ..errors import RepositoryError

Sink = Callable[[memoryview], None]
READ_BYTES = 4 << 20  # file:// reads
SOCKET_READ = 1 << 20  # one recv from a server


class Retryable(Exception):
    """A failure that another attempt may not meet: a stall, a dropped connection, a 5xx."""


class Remote:
    url: str

    def get(self, rel: str, missing_ok: bool = False) -> bytes | None:
        raise NotImplementedError

    def read_range(self, rel: str, start: int, end: int, sink: Sink) -> None:
        """Streams bytes [start, end) of `rel` into sink, in pieces, in order."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FileRemote(Remote):
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.root = Path(unquote(urlsplit(url).path)) if url.startswith("file:") else Path(url)

    def child(self, rel: str) -> "FileRemote":
        return FileRemote(f"{self.url}/{quote(rel)}")

    def get(self, rel: str, missing_ok: bool = False) -> bytes | None:
        try:
            return (self.root / rel).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            if missing_ok:
                return None
            raise RepositoryError(f"{self.url}/{rel}: no such file") from None
        except OSError as e:
            raise RepositoryError(f"{self.url}/{rel}: unreadable: {e}") from None

    def read_range(self, rel: str, start: int, end: int, sink: Sink) -> None:
        path = self.root / rel
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise RepositoryError(f"{self.url}/{rel}: unreadable: {e}") from None
        try:
            pos = start
            while pos < end:
                data = os.pread(fd, min(READ_BYTES, end - pos), pos)
                if not data:
                    raise RepositoryError(f"{self.url}/{rel}: ends at byte {pos}, the index says {end} or more")
                sink(memoryview(data))
                pos += len(data)
        finally:
            os.close(fd)


def _larger_reads() -> None:
    """httpcore reads a response 64 KiB at a time; 1 MiB reads halve the CPU a download takes
    (measured on loopback against nginx: bench/repository_bench.py), and CPU is what bounds it."""
    try:
        from httpcore._sync.http11 import HTTP11Connection
        HTTP11Connection.READ_NUM_BYTES = max(HTTP11Connection.READ_NUM_BYTES, SOCKET_READ)
    except (ImportError, AttributeError):  # another httpcore: its own read size stands
        pass


class HttpRemote(Remote):
    def __init__(self, url: str, connections: int = 8, timeout_s: float = 30.0):
        import httpx

        self.url, self.timeout_s = url.rstrip("/"), timeout_s
        self._httpx = httpx
        _larger_reads()
        self.client = httpx.Client(
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0), pool=None),
            headers={"User-Agent": "sllmd", "Accept-Encoding": "identity"}, follow_redirects=True)

    def child(self, rel: str) -> "HttpRemote":
        """The same connections, rooted at `rel` (a model's directory)."""
        other = object.__new__(HttpRemote)
        other.__dict__.update(self.__dict__, url=f"{self.url}/{quote(rel)}")
        return other

    def close(self) -> None:
        self.client.close()

    def _status(self, url: str, status: int, missing_ok: bool) -> bool:
        """False for a missing file that may be; raises for any other failure."""
        if status in (404, 410) and missing_ok:
            return False
        if status >= 500 or status == 429:
            raise Retryable(f"GET {url}: HTTP {status}")
        if status >= 400:
            raise RepositoryError(f"GET {url}: HTTP {status}")
        return True

    def _transport_error(self, url: str, e: Exception) -> Exception:
        if isinstance(e, self._httpx.TimeoutException):
            return Retryable(f"GET {url}: the server sent nothing for {self.timeout_s:g} s ({type(e).__name__})")
        return Retryable(f"GET {url}: {type(e).__name__}: {e}")

    def get(self, rel: str, missing_ok: bool = False) -> bytes | None:
        url = f"{self.url}/{quote(rel)}"
        try:
            r = self.client.get(url)
        except self._httpx.HTTPError as e:
            raise self._transport_error(url, e) from None
        if not self._status(url, r.status_code, missing_ok):
            return None
        return r.content

    def read_range(self, rel: str, start: int, end: int, sink: Sink) -> None:
        url = f"{self.url}/{quote(rel)}"
        try:
            with self.client.stream("GET", url, headers={"Range": f"bytes={start}-{end - 1}"}) as r:
                self._status(url, r.status_code, False)
                if r.status_code != 206:
                    raise RepositoryError(f"GET {url}: the server answered {r.status_code} to a Range request "
                                          f"(it must serve byte ranges, as nginx does)")
                got = 0
                for chunk in r.iter_raw():
                    got += len(chunk)
                    sink(memoryview(chunk))
                if got < end - start:
                    raise Retryable(f"GET {url}: the connection ended after {got} of {end - start} bytes")
        except self._httpx.HTTPError as e:
            raise self._transport_error(url, e) from None


def open_remote(url: str, connections: int = 8, timeout_s: float = 30.0) -> Remote:
    if url.startswith(("http://", "https://")):
        return HttpRemote(url, connections, timeout_s)
    return FileRemote(url)
