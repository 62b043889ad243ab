"""The transport interface: how the daemon and its clients move frames.

A server endpoint receives (peer, frames, credentials) from many clients and
sends frames back to a named peer; a client endpoint talks to one server. Two
implementations: `ZmqTransport` (ROUTER/DEALER over ipc:// or tcp://) and
`MemoryTransport` (in-process, so several daemons can be tested in one
process). Only I/O code touches an endpoint; `wake()` is the one method any
thread may call.
"""
from __future__ import annotations

import abc
import enum

from sllmd.errors import ConfigError

from .credentials import Credentials


class SendResult(enum.Enum):
    SENT = "sent"
    GONE = "gone"   # the peer has disconnected: its requests can be cancelled
    FULL = "full"   # the peer's queue is at its high-water mark: try again later


Received = tuple[bytes, list[bytes], "Credentials | None"]


def check_listen_address(address: str) -> None:
    """Refuses what the daemon must not listen on yet: only local (ipc) sockets, whose file mode
    and the kernel's peer credentials say who may connect. A network socket waits for CurveZMQ."""
    if "://" in address and not address.startswith("ipc://"):
        raise ConfigError(f"socket: {address.split('://', 1)[0]}:// is refused: peer traffic needs "
                          "CurveZMQ keys (they come with the cluster); use a Unix socket path")


class ServerEndpoint(abc.ABC):
    address: str

    @abc.abstractmethod
    def recv(self, timeout: float | None) -> list[Received]:
        """Waits up to `timeout` seconds (None: forever) for frames.

        Returns every (peer, frames, credentials) available, or [] on timeout or `wake()`.
        `credentials` is who the kernel says opened the connection (None where unknown).
        """

    @abc.abstractmethod
    def send(self, peer: bytes, frame: bytes) -> SendResult:
        """Sends one frame to `peer` without blocking."""

    @abc.abstractmethod
    def wake(self) -> None:
        """Makes a blocked `recv` return early. Thread-safe; cheap when called often."""

    @abc.abstractmethod
    def close(self) -> None:
        """Idempotent."""


class ClientEndpoint(abc.ABC):
    address: str

    @abc.abstractmethod
    def send(self, frame: bytes, timeout: float | None) -> bool:
        """Sends one frame; False if it could not be queued within `timeout`."""

    @abc.abstractmethod
    def recv(self, timeout: float | None) -> list[bytes] | None:
        """The next message's frames, or None after `timeout` seconds."""

    @abc.abstractmethod
    def close(self) -> None:
        """Idempotent; drops unsent frames."""


class Transport(abc.ABC):
    @abc.abstractmethod
    def bind(self, address: str, *, max_frame_bytes: int, mode: int = 0o600) -> ServerEndpoint:
        """Listens on `address`; raises AddressInUseError if another server holds it."""

    @abc.abstractmethod
    def connect(self, address: str) -> ClientEndpoint:
        """Connects to `address`; raises DaemonUnreachableError if nothing listens there."""

    @abc.abstractmethod
    def close(self) -> None:
        """Releases the transport after its endpoints are closed. Idempotent."""
