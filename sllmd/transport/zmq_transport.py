"""The ZeroMQ transport: a ROUTER for the daemon, a DEALER per client, over ipc:// (tcp:// waits for CurveZMQ).

Every ZeroMQ socket in sllm is made by `make_socket`, which sets linger,
high-water marks and the message-size cap, and binds or connects. An ipc
socket file is created with permission `mode` (0600 by default): the bind
happens under a umask that leaves nobody else any access, then the file is
chmod'ed to `mode`. Binding refuses to take over a socket file that a live
daemon still answers on, and removes a stale one. Each received message
carries the kernel's credentials of the process that opened its connection
(SO_PEERCRED, which libzmq appends to the "Peer-Address" metadata).
"""
from __future__ import annotations

import errno
import logging
import os
import socket as pysocket
import stat
import threading

import zmq

from sllmd.errors import AddressInUseError, DaemonUnreachableError

from .base import ClientEndpoint, SendResult, ServerEndpoint, Transport, check_listen_address
from .credentials import Credentials, parse_peer_address

log = logging.getLogger(__name__)

HARD_CAP_FACTOR = 4       # frames up to 4x max_frame_bytes are received (and answered "oversized");
                          # larger ones make ZeroMQ drop the connection before they use memory
DEFAULT_HWM = 10_000
MAX_KNOWN_ADDRESSES = 4096   # parsed Peer-Address strings kept (one per connection)
MAX_IPC_PATH = 107        # sizeof(sockaddr_un.sun_path) - 1 on Linux


def ipc_path(address: str) -> str | None:
    return address[len("ipc://"):] if address.startswith("ipc://") else None


def probe_ipc(path: str) -> bool:
    """True if something accepts connections on the Unix socket `path`."""
    s = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(path)
        return True
    except (ConnectionRefusedError, FileNotFoundError, NotADirectoryError):
        return False
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
            return False
        raise
    finally:
        s.close()


def _prepare_ipc_bind(path: str) -> None:
    if len(path.encode()) > MAX_IPC_PATH:
        raise AddressInUseError(f"socket path is longer than {MAX_IPC_PATH} bytes: {path}")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, mode=0o700, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise AddressInUseError(f"{path} exists and is not a socket; refusing to replace it")
    if probe_ipc(path):
        raise AddressInUseError(f"another daemon is already listening on {path}")
    log.info("removing stale socket %s", path)
    os.unlink(path)


def make_socket(ctx: zmq.Context, kind: int, *, bind: str | None = None, connect: str | None = None,
                linger_ms: int = 0, sndhwm: int = DEFAULT_HWM, rcvhwm: int = DEFAULT_HWM,
                max_msg_size: int | None = None, router_mandatory: bool = False, mode: int = 0o600,
                options: dict[int, object] | None = None) -> zmq.Socket:
    """Makes, configures and binds or connects one ZeroMQ socket (the only place sockets are made).
    `options`: further socket options set before the bind or connect (e.g. CurveZMQ keys)."""
    if (bind is None) == (connect is None):
        raise ValueError("give exactly one of bind and connect")
    sock = ctx.socket(kind)
    try:
        sock.setsockopt(zmq.LINGER, linger_ms)
        sock.setsockopt(zmq.SNDHWM, sndhwm)
        sock.setsockopt(zmq.RCVHWM, rcvhwm)
        if max_msg_size is not None:
            sock.setsockopt(zmq.MAXMSGSIZE, max_msg_size)
        if router_mandatory:
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        for option, value in (options or {}).items():
            sock.setsockopt(option, value)
        if connect is not None:
            sock.connect(connect)
            return sock
        path = ipc_path(bind)
        if path is None:
            sock.bind(bind)
            return sock
        _prepare_ipc_bind(path)
        old = os.umask(0o177)   # the file is born 0600 at most; no window where others may connect
        try:
            sock.bind(bind)
        finally:
            os.umask(old)
        os.chmod(path, mode)
        return sock
    except BaseException:
        sock.close(linger=0)
        raise


class ZmqServerEndpoint(ServerEndpoint):
    def __init__(self, ctx: zmq.Context, address: str, max_frame_bytes: int, mode: int,
                 options: dict[int, object] | None = None):
        if not (options or {}).get(zmq.CURVE_SERVER):   # tcp:// only as a CurveZMQ server (the peer socket)
            check_listen_address(address)
        self.address = address
        self._credentials: dict[str, Credentials | None] = {}
        self._sock = make_socket(ctx, zmq.ROUTER, bind=address, linger_ms=1000, router_mandatory=True,
                                 max_msg_size=max_frame_bytes * HARD_CAP_FACTOR, mode=mode, options=options)
        path = ipc_path(address)
        self._inode = os.stat(path).st_ino if path else None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._wake_r, zmq.POLLIN)
        self._closed = False
        self._close_lock = threading.Lock()

    def recv(self, timeout):
        ms = None if timeout is None else max(0, int(timeout * 1000))
        events = dict(self._poller.poll(ms))
        if self._wake_r in events:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        out = []
        if self._sock in events:
            for _ in range(256):
                try:
                    frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                cred = self._credentials_of(frames[-1]) if len(frames) > 1 else None
                out.append((frames[0].bytes, [f.bytes for f in frames[1:]], cred))
                if not self._sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    break   # cheaper than a recv that raises Again (~15 us each)
        return out

    def _credentials_of(self, frame: zmq.Frame) -> Credentials | None:
        try:
            address = frame.get("Peer-Address")
        except zmq.ZMQError:
            return None
        if address not in self._credentials:
            if len(self._credentials) >= MAX_KNOWN_ADDRESSES:
                self._credentials.clear()
            self._credentials[address] = parse_peer_address(address) if self.address.startswith("ipc://") else None
        return self._credentials[address]

    def send(self, peer, frame):
        try:
            if isinstance(frame, tuple):   # a reply of several frames (a peer_fetch's data): not copied
                self._sock.send_multipart([peer, *frame], zmq.NOBLOCK, copy=False)
            else:
                self._sock.send_multipart([peer, frame], zmq.NOBLOCK)
            return SendResult.SENT
        except zmq.Again:
            return SendResult.FULL
        except zmq.ZMQError as e:
            if e.errno == zmq.EHOSTUNREACH:
                return SendResult.GONE
            raise

    def wake(self):
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass   # the pipe is full (a wake-up is already pending) or closed (shutting down)

    def close(self):
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        path = ipc_path(self.address)
        if path:   # ZeroMQ removes the file itself; make sure, but never remove a successor's socket
            try:
                if os.stat(path).st_ino == self._inode:
                    os.unlink(path)
            except FileNotFoundError:
                pass


class ZmqClientEndpoint(ClientEndpoint):
    def __init__(self, ctx: zmq.Context, address: str, options: dict[int, object] | None = None):
        self.address = address
        self._sock = make_socket(ctx, zmq.DEALER, connect=address, linger_ms=0, options=options)
        self._closed = False

    def send(self, frame, timeout=None):
        if not self._sock.poll(None if timeout is None else int(timeout * 1000), zmq.POLLOUT):
            return False
        try:
            self._sock.send(frame, zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def recv(self, timeout):
        if not self._sock.poll(None if timeout is None else max(0, int(timeout * 1000)), zmq.POLLIN):
            return None
        return self._sock.recv_multipart(zmq.NOBLOCK)

    def recv_frames(self, timeout):
        """As recv, but the frames as zmq.Frame (their memory not copied), or None."""
        if not self._sock.poll(None if timeout is None else max(0, int(timeout * 1000)), zmq.POLLIN):
            return None
        return self._sock.recv_multipart(zmq.NOBLOCK, copy=False)

    def close(self):
        if not self._closed:
            self._closed = True
            self._sock.close(linger=0)


class ZmqTransport(Transport):
    """Owns one ZeroMQ context; close its endpoints first, then the transport (which ends the context)."""

    def __init__(self, io_threads: int = 1):
        self._ctx = zmq.Context(io_threads=io_threads)
        self._closed = False

    def bind(self, address, *, max_frame_bytes, mode=0o600):
        return ZmqServerEndpoint(self._ctx, address, max_frame_bytes, mode)

    def connect(self, address):
        path = ipc_path(address)
        if path is not None and not probe_ipc(path):
            hint = "start it with `sllmd` or `systemctl start sllmd`"
            if os.path.exists(path):
                raise DaemonUnreachableError(f"sllmd is not running (stale socket {path}); {hint}")
            raise DaemonUnreachableError(f"sllmd is not running (no socket at {path}); {hint}")
        return ZmqClientEndpoint(self._ctx, address)

    def close(self):
        if not self._closed:
            self._closed = True
            self._ctx.term()
