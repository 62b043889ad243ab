"""The sllmd process lifecycle: start, serve, stop.

    created ──start()──► running ──signal / request_shutdown()──► stopping ──► stopped

Shutdown is an explicit state. Signal handlers (SIGTERM, SIGINT, SIGHUP) only
record that a stop was asked for; the main thread notices and runs
`shutdown()`, which is idempotent:

  1. STOPPING=1 to systemd; new requests get `shutting_down`;
  2. in-flight requests get `shutdown_grace_s` to finish (a second signal cuts this short);
  3. the node closes, which fails what is still running (those clients get an error reply),
     within NODE_CLOSE_S: a node that takes longer is left behind (its writes are atomic, so
     this is as safe as a kill) and the process exits anyway;
  4. the server flushes the last replies and closes its socket (SERVER_CLOSE_S); then the
     ZeroMQ context ends.

A stop therefore takes at most `stop_bound_s(config)` = shutdown_grace + NODE_CLOSE_S +
SERVER_CLOSE_S; the systemd unit's TimeoutStopSec is above that for the default grace.

READY=1 goes to systemd ($NOTIFY_SOCKET, no python-systemd needed) once the
socket is bound and the node started, i.e. once requests are served.
"""
from __future__ import annotations

import enum
import logging
import os
import signal
import socket
import threading
import time
from typing import Any, Callable, Mapping

from sllmd.config import Config
from sllmd.errors import SllmError
from sllmd.server import Server
from sllmd.transport import Transport, ZmqTransport

log = logging.getLogger(__name__)

NODE_CLOSE_S = 10.0      # closing the node: loads in flight, instances' threads, background builds
SERVER_CLOSE_S = 5.0     # flushing the last replies


def stop_bound_s(config: Config) -> float:
    """The longest a stop takes, from the signal to the exit."""
    return config.shutdown_grace_s + NODE_CLOSE_S + SERVER_CLOSE_S


class State(enum.Enum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


def sd_notify(state: str, env: Mapping[str, str]) -> bool:
    """Sends `state` (e.g. "READY=1") to systemd's notify socket, if there is one."""
    address = env.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]   # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(state.encode())
        return True
    except OSError as e:
        log.warning("could not notify systemd (%s): %s", state.split("\n")[0], e)
        return False


def _default_node_factory(config: Config) -> Any:
    from sllmd.node import Node
    return Node(config)


class Daemon:
    def __init__(self, config: Config, *, env: Mapping[str, str] | None = None,
                 transport: Transport | None = None, node_factory: Callable[[Config], Any] | None = None):
        self.config = config
        self._env = dict(os.environ if env is None else env)
        self._transport = transport
        self._own_transport = transport is None
        self._node_factory = node_factory or _default_node_factory
        self.state = State.CREATED
        self.node: Any = None
        self.server: Server | None = None
        self.cluster: Any = None   # sllmd.cluster.coordinator.Cluster when the config enables one
        self.http: Any = None      # sllmd.http.server.HttpServer with --http
        self._endpoint = None
        self._stop_requested: str | None = None   # written by signal handlers: nothing else happens there
        self._stop_count = 0
        self._shutdown_lock = threading.Lock()

    # --- asking for a stop (signal-safe) -----------------------------------------------------------------
    def request_shutdown(self, reason: str = "requested") -> None:
        self._stop_count += 1
        self._stop_requested = reason

    def _on_signal(self, signum, _frame) -> None:
        self.request_shutdown(signal.Signals(signum).name)

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    # --- running --------------------------------------------------------------------------------------
    def start(self) -> None:
        """Binds the socket (refusing if another daemon holds it), starts the node, then serves."""
        if self.state is not State.CREATED:
            raise RuntimeError(f"cannot start a daemon that is {self.state.value}")
        self.state = State.STARTING
        cfg = self.config
        if self._transport is None:
            self._transport = ZmqTransport()
        address = cfg.socket if "://" in cfg.socket else "ipc://" + cfg.socket
        self._endpoint = self._transport.bind(address, max_frame_bytes=cfg.max_frame_bytes, mode=cfg.socket_mode)
        log.info("bound %s (mode %04o)", address, cfg.socket_mode)
        started = time.monotonic()
        self.node = self._node_factory(cfg)
        self.node.start()
        log.info("node started in %.2f s (store %s, device %s)", time.monotonic() - started, cfg.store_dir,
                 cfg.device)
        if getattr(cfg, "cluster_enabled", False):   # Serf agent, peer socket, state sync: only with --peer-listen
            from sllmd.cluster.coordinator import Cluster
            self.cluster = Cluster(cfg, self.node)
            self.cluster.start()
        from sllmd.http.metrics import Metrics
        metrics = Metrics(self.node, self.cluster)   # one registry: `sllmctl metrics` and GET /metrics
        self.server = Server(self.node, self._endpoint, max_frame_bytes=cfg.max_frame_bytes,
                             heartbeat_s=cfg.heartbeat_s, max_streams=cfg.max_streams, cluster=self.cluster,
                             metrics=metrics)
        self.server.start()
        if getattr(cfg, "http", None):   # the OpenAI API: only with --http
            from sllmd.http.server import HttpServer
            self.http = HttpServer(cfg, self.node, self.cluster, metrics=metrics)
            self.http.start()
        self.state = State.RUNNING
        http = f"; http on {self.http.url}" if self.http is not None else ""
        sd_notify(f"READY=1\nSTATUS=serving on {cfg.socket}{http}\nMAINPID={os.getpid()}", self._env)

    def run(self) -> int:
        """Starts, serves until a stop is asked for, shuts down. Returns the process exit code."""
        if threading.current_thread() is threading.main_thread():
            self.install_signal_handlers()
        try:
            self.start()
        except SllmError as e:
            log.error("cannot start: %s", e)
            self.shutdown()
            return e.exit_code
        except Exception:
            log.exception("cannot start")
            self.shutdown()
            return 1
        log.info("sllmd %d ready on %s", os.getpid(), self.config.socket)
        while self._stop_requested is None:
            if (self.server is not None and not self.server.serving) or (self.http is not None
                                                                          and not self.http.serving):
                log.error("the %s server stopped unexpectedly",
                          "HTTP" if self.server is not None and self.server.serving else "IPC")
                self.shutdown()
                return 1
            time.sleep(0.1)
        log.info("stopping (%s)", self._stop_requested)
        self.shutdown()
        return 0

    def shutdown(self) -> None:
        """Stops everything, in order; safe to call more than once and from any state."""
        with self._shutdown_lock:
            if self.state in (State.STOPPING, State.STOPPED):
                return
            self.state = State.STOPPING
        if self.http is not None:   # before STOPPING=1: whoever sees it gets 503 from then on
            self.http.stop_accepting()
        sd_notify("STOPPING=1", self._env)
        try:
            if self.server is not None:
                self.server.stop_accepting()
                self._grace()
            if self.cluster is not None:   # leave (peers see `left`) before the node goes
                self._close_cluster()
            http_closer = self._close_http()   # alongside the node's close, within its bound
            if self.node is not None:
                self._close_node(NODE_CLOSE_S)
            if http_closer is not None:
                http_closer.join(NODE_CLOSE_S)
            if self.server is not None:
                self.server.close(timeout=SERVER_CLOSE_S)
            elif self._endpoint is not None:
                self._endpoint.close()
        finally:
            if self._own_transport and self._transport is not None:
                self._transport.close()   # the context ends after every socket is closed
            self.state = State.STOPPED
            log.info("stopped")

    def _close_node(self, timeout: float) -> None:
        def close():
            try:
                self.node.close()
            except Exception:
                log.exception("closing the node failed")
        closer = threading.Thread(target=close, name="sllm-node-close", daemon=True)
        closer.start()
        closer.join(timeout)
        if closer.is_alive():
            log.warning("the node did not close within %.0f s; stopping without it", timeout)

    def _close_http(self) -> threading.Thread | None:
        if self.http is None:
            return None

        def close():
            try:
                self.http.close(timeout=NODE_CLOSE_S / 2)
            except Exception:
                log.exception("closing the HTTP server failed")
        closer = threading.Thread(target=close, name="sllm-http-close", daemon=True)
        closer.start()
        return closer

    def _close_cluster(self) -> None:
        try:
            self.cluster.close()
        except Exception:
            log.exception("leaving the cluster failed")

    @staticmethod
    def stragglers() -> list[str]:
        """Threads other than the caller's still running (e.g. a model thread that did not stop in time)."""
        return [t.name for t in threading.enumerate() if t is not threading.current_thread() and t.is_alive()]

    def _grace(self) -> None:
        """Lets in-flight requests finish for up to shutdown_grace_s, less if another stop is asked for."""
        count_at_start = self._stop_count
        deadline = time.monotonic() + self.config.shutdown_grace_s
        while True:
            n = self.server.in_flight() + (self.http.in_flight() if self.http is not None else 0)
            if n == 0:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stop_count > max(count_at_start, 1):
                log.warning("cancelling %d in-flight request(s)", n)
                self.server.cancel_all()
                if self.http is not None:
                    self.http.cancel_all()
                return
            if self.server.in_flight():
                self.server.wait_idle(min(remaining, 0.1))
            else:   # only HTTP requests are running
                self.http.front.streams.wait_idle(min(remaining, 0.1))
