"""uvicorn inside the daemon, on its own thread, with a clean shutdown.

The daemon binds the listening socket itself in `start()` (so an address in use
fails the start, as the Unix socket does), then uvicorn serves it on a thread
with its own event loop. The daemon's shutdown calls, in order:
`stop_accepting()` (new /v1 requests get 503, /healthz says shutting_down),
`in_flight()` / `cancel_all()` during its grace, then `close()`: uvicorn stops
listening, closes idle connections, gives open ones HTTP_GRACE_S, and the
thread ends.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import socket
import threading
import time
from typing import Any

from sllmd.errors import AddressInUseError, ConfigError

log = logging.getLogger(__name__)

HTTP_GRACE_S = 2.0         # uvicorn's graceful shutdown for connections still open after the daemon's grace
START_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 1024     # beyond this many open connections uvicorn answers 503 at once


def split_host_port(address: str) -> tuple[str, int]:
    """("127.0.0.1", 8000) from "127.0.0.1:8000"; "[::1]:8000" for IPv6."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def bind(address: str) -> socket.socket:
    host, port = split_host_port(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only when the socket says TCP.
    # Without it Nagle holds a stream's first chunk until the client acknowledges the headers (+40 ms TTFT).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # TIME_WAIT leftovers, not a live listener
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise AddressInUseError(f"http: {address} is already in use") from None
        raise ConfigError(f"http: cannot listen on {address}: {e.strerror or e}") from None
    return sock


class HttpServer:
    def __init__(self, config: Any, node: Any, cluster: Any = None, metrics: Any = None):
        import socket as _socket
        from sllmd.http.app import Frontend, build_app
        from sllmd.http.auth import load_api_key
        from sllmd.http.metrics import Metrics
        from sllmd.http.streaming import Streams

        self.config = config
        api_key = load_api_key(config.api_key_file) if getattr(config, "api_key_file", None) else None
        self.front = Frontend(node=node, cluster=cluster,
                              node_name=getattr(config, "node_name", None) or _socket.gethostname(),
                              max_body=config.max_frame_bytes, streams=Streams(config.max_streams),
                              api_key=api_key, metrics=metrics if metrics is not None else Metrics(node, cluster))
        self.app = build_app(self.front)
        self._sock: socket.socket | None = None
        self._server = None
        self._thread: threading.Thread | None = None
        self.address: str | None = None   # HOST:PORT actually bound (a port 0 asks for a free one)

    @property
    def url(self) -> str:
        host, port = split_host_port(self.address or self.config.http)
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self) -> None:
        import uvicorn

        self._sock = bind(self.config.http)
        host, port = self._sock.getsockname()[:2]
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        uconfig = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off", loop="asyncio",
                                 timeout_graceful_shutdown=HTTP_GRACE_S, limit_concurrency=MAX_CONNECTIONS,
                                 server_header=False)
        self._server = uvicorn.Server(uconfig)
        self._thread = threading.Thread(target=self._serve, name="sllmd-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.close(timeout=1.0)
                raise ConfigError(f"http: the server on {self.address} did not start (see the log)")
            time.sleep(0.01)
        log.info("HTTP (OpenAI API) on %s%s", self.url, " (API key required)" if self.front.api_key else "")

    def _serve(self) -> None:
        try:
            asyncio.run(self._server.serve(sockets=[self._sock]))
        except BaseException:   # noqa: BLE001 -- logged; the daemon notices `serving`
            log.exception("the HTTP server failed")

    @property
    def serving(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- the daemon's shutdown -----------------------------------------------------------------------
    def stop_accepting(self) -> None:
        self.front.accepting = False

    def in_flight(self) -> int:
        return self.front.streams.in_flight()

    def cancel_all(self) -> None:
        self.front.streams.cancel_all()

    def close(self, timeout: float = 5.0) -> None:
        """Idempotent: cancels what still runs, stops uvicorn, waits for its thread (up to `timeout`)."""
        self.stop_accepting()
        self.cancel_all()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join(1.0)
                if self._thread.is_alive():
                    log.warning("the HTTP server did not stop within %.0f s", timeout)
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
        log.info("HTTP server closed")
