"""An in-memory transport with the semantics of the ZeroMQ one, for tests of several daemons in one process.

A `MemoryTransport` is a small network: endpoints bound on it are found by
address; each client connection gets its own peer id; a closed client makes
sends to it report GONE; a frame over the server's limit is refused the way
ZeroMQ's MAXMSGSIZE refuses it (the connection is dropped) when it is over
the hard cap, and otherwise delivered for the server to answer.
"""
from __future__ import annotations

import collections
import itertools
import threading
import time

from sllmd.errors import AddressInUseError, DaemonUnreachableError

from .base import ClientEndpoint, SendResult, ServerEndpoint, Transport
from .credentials import Credentials

HARD_CAP_FACTOR = 4   # like ZmqTransport: frames up to 4x max_frame_bytes reach the server to be answered


class _Inbox:
    def __init__(self, limit: int):
        self.items: collections.deque = collections.deque()
        self.cond = threading.Condition()
        self.limit = limit
        self.woken = False

    def put(self, item) -> bool:
        with self.cond:
            if len(self.items) >= self.limit:
                return False
            self.items.append(item)
            self.cond.notify_all()
            return True

    def wait(self, timeout: float | None, take_all: bool):
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while not self.items and not self.woken:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self.cond.wait(remaining)
            self.woken = False
            if not self.items:
                return []
            if take_all:
                out = list(self.items)
                self.items.clear()
                return out
            return [self.items.popleft()]

    def wake(self):
        with self.cond:
            self.woken = True
            self.cond.notify_all()


class MemoryServerEndpoint(ServerEndpoint):
    def __init__(self, network: "MemoryTransport", address: str, max_frame_bytes: int, hwm: int):
        self.address = address
        self._network = network
        self.hard_cap = max_frame_bytes * HARD_CAP_FACTOR
        self.inbox = _Inbox(limit=hwm * 64)
        self.clients: dict[bytes, MemoryClientEndpoint] = {}
        self.closed = False

    def recv(self, timeout):
        return self.inbox.wait(timeout, take_all=True)

    def send(self, peer, frame):
        client = self.clients.get(peer)
        if client is None or client.closed:
            return SendResult.GONE
        return SendResult.SENT if client.inbox.put([bytes(frame)]) else SendResult.FULL

    def wake(self):
        self.inbox.wake()

    def close(self):
        if not self.closed:
            self.closed = True
            self._network._unbind(self)


class MemoryClientEndpoint(ClientEndpoint):
    def __init__(self, server: MemoryServerEndpoint, peer: bytes, hwm: int, credentials: Credentials | None):
        self.address = server.address
        self.server = server
        self.peer = peer
        self.credentials = credentials
        self.inbox = _Inbox(limit=hwm)
        self.closed = False

    def send(self, frame, timeout=None):
        if self.closed:
            raise RuntimeError("endpoint is closed")
        if self.server.closed:
            return False   # like a DEALER whose peer vanished: nothing is delivered
        if len(frame) > self.server.hard_cap:
            return True    # ZeroMQ drops the connection; the sender learns nothing
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.server.inbox.put((self.peer, [bytes(frame)], self.credentials)):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.001)
        return True

    def recv(self, timeout):
        got = self.inbox.wait(timeout, take_all=False)
        return got[0] if got else None

    def close(self):
        self.closed = True


class MemoryTransport(Transport):
    def __init__(self, hwm: int = 10_000):
        self._servers: dict[str, MemoryServerEndpoint] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._hwm = hwm

    def bind(self, address, *, max_frame_bytes, mode=0o600):
        with self._lock:
            if address in self._servers:
                raise AddressInUseError(f"another server listens on {address}")
            server = MemoryServerEndpoint(self, address, max_frame_bytes, self._hwm)
            self._servers[address] = server
            return server

    def connect(self, address, credentials: Credentials | None = None):
        """`credentials`: who the server is told connected (default: this process)."""
        with self._lock:
            server = self._servers.get(address)
            if server is None:
                raise DaemonUnreachableError(f"no daemon listens on {address}")
            peer = b"mem-%d" % next(self._ids)
            client = MemoryClientEndpoint(server, peer, self._hwm, credentials or Credentials.of_this_process())
            server.clients[peer] = client
            return client

    def _unbind(self, server: MemoryServerEndpoint):
        with self._lock:
            if self._servers.get(server.address) is server:
                del self._servers[server.address]

    def close(self):
        pass
