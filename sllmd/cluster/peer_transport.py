"""The peer socket's transport: ZeroMQ over TCP with CurveZMQ on every connection.

    peer A (DEALER, CURVE client: A's key pair + B's public key) ──tcp──► B (ROUTER, CURVE server)
                                                                           │ ZAP: is A's key a member's?
                                                         pyzmq's authenticator thread ◄┘ admitted(key)

The server's ZAP handler is pyzmq's authenticator with a callback (configure_curve_callback),
so the keys it admits follow Serf membership as it changes: a member's key is admitted, an
unknown one fails the handshake and its connection never delivers a frame. Each received
message carries the peer's public key (the ZAP User-Id, z85) as its credentials, so the
server knows which member is asking. The sockets themselves come from the one helper
(sllmd.transport.zmq_transport.make_socket); only the Curve options are added here.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import zmq
from zmq.auth.thread import ThreadAuthenticator

from sllmd.errors import AddressInUseError, ConfigError
from sllmd.transport import ClientEndpoint, Transport
from sllmd.transport.zmq_transport import ZmqClientEndpoint, ZmqServerEndpoint

log = logging.getLogger(__name__)

DEFAULT_MAX_FRAME = 16 << 20
ZAP_DOMAIN = "sllm-peers"  # the domain our ZAP handler answers for
REFUSAL_LOG_S = 60.0
MAX_REPLY_BYTES = 4 * DEFAULT_MAX_FRAME   # any one message a peer may send us; ZeroMQ drops a connection that tries more
HANDSHAKE_MS = 5000        # a connection that has not finished its Curve handshake by then is dropped


class _MemberKeys:
    """The authenticator's credentials provider: asks `admitted` about each connecting key."""

    def __init__(self, admitted: Callable[[bytes], bool]):
        self._admitted = admitted
        self._logged: dict[bytes, float] = {}   # a refused peer reconnects every 100 ms: log it once a minute

    def callback(self, domain: str, key: bytes) -> bool:
        try:
            ok = bool(self._admitted(key))
        except Exception:
            log.exception("checking a peer key failed; refusing it")
            ok = False
        if not ok:
            now = time.monotonic()
            if now - self._logged.get(key, -REFUSAL_LOG_S) >= REFUSAL_LOG_S:
                if len(self._logged) > 1024:
                    self._logged.clear()
                self._logged[key] = now
                log.info("peer socket: refused a connection with key %s (not a current member's)",
                         key.decode("ascii", "replace"))
        return ok


class PeerServerEndpoint(ZmqServerEndpoint):
    """A ROUTER bound on tcp:// as CURVE server, with its own context and ZAP handler."""

    def __init__(self, address: str, public: bytes, secret: bytes, admitted: Callable[[bytes], bool],
                 max_frame_bytes: int = DEFAULT_MAX_FRAME):
        if not address.startswith("tcp://"):
            raise ConfigError(f"peer_listen: expected tcp://HOST:PORT, got {address!r}")
        self._ctx = zmq.Context(io_threads=1)
        self._auth = ThreadAuthenticator(self._ctx, log=logging.getLogger(__name__ + ".zap"))
        try:
            self._auth.start()
            self._auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=_MemberKeys(admitted))
            super().__init__(self._ctx, address, max_frame_bytes, 0o600, options={
                zmq.CURVE_SERVER: 1, zmq.CURVE_PUBLICKEY: public, zmq.CURVE_SECRETKEY: secret,
                zmq.ZAP_DOMAIN: ZAP_DOMAIN.encode(), zmq.HANDSHAKE_IVL: HANDSHAKE_MS})
        except zmq.ZMQError as e:
            self._stop_context()
            if e.errno == zmq.EADDRINUSE:
                raise AddressInUseError(f"peer_listen: {address} is already in use") from None
            raise ConfigError(f"peer_listen: cannot listen on {address}: {e}") from None
        except BaseException:
            self._stop_context()
            raise
        self.address = self.bound_address()   # with port 0, the port the kernel picked
        self._close_once = threading.Lock()
        self._ended = False

    def _credentials_of(self, frame: zmq.Frame):
        """The connecting member's public key (z85 text), as the ZAP handler named it."""
        try:
            return frame.get("User-Id")
        except zmq.ZMQError:
            return None

    def bound_address(self) -> str:
        """The address actually bound (a port of 0 picked a free one)."""
        return self._sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def _stop_context(self) -> None:
        try:
            self._auth.stop()
        except Exception:
            log.debug("stopping the authenticator failed", exc_info=True)
        self._ctx.term()

    def close(self) -> None:
        with self._close_once:
            if self._ended:
                return
            self._ended = True
        super().close()
        self._stop_context()


class PeerTransport(Transport):
    """Connects to peers as a CURVE client with this node's key pair; one context for all."""

    def __init__(self, public: bytes, secret: bytes):
        self._public, self._secret = public, secret
        self._ctx = zmq.Context(io_threads=1)
        self._closed = False

    def bind(self, address, *, max_frame_bytes, mode=0o600):
        raise NotImplementedError("a peer socket is bound with bind_peer()")

    def connect(self, address: str, server_public: bytes | None = None) -> ClientEndpoint:
        if server_public is None:
            raise ConfigError("connecting to a peer needs its Curve public key")
        return connect_peer(address, server_public, self._public, self._secret, ctx=self._ctx)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._ctx.term()


def bind_peer(address: str, public: bytes, secret: bytes, admitted: Callable[[bytes], bool], *,
              max_frame_bytes: int = DEFAULT_MAX_FRAME) -> PeerServerEndpoint:
    """The peer socket: CURVE server on `address`, admitting a key only while `admitted(key)` (z85)."""
    return PeerServerEndpoint(address, public, secret, admitted, max_frame_bytes)


def connect_peer(address: str, server_public: bytes, public: bytes, secret: bytes, *,
                 ctx: zmq.Context) -> ClientEndpoint:
    """A DEALER to a peer's socket; frames flow only once the peer has admitted our key."""
    if not address.startswith("tcp://"):
        raise ConfigError(f"a peer endpoint is tcp://HOST:PORT, got {address!r}")
    return ZmqClientEndpoint(ctx, address, options={
        zmq.CURVE_SERVERKEY: server_public, zmq.CURVE_PUBLICKEY: public, zmq.CURVE_SECRETKEY: secret,
        zmq.HANDSHAKE_IVL: HANDSHAKE_MS, zmq.MAXMSGSIZE: MAX_REPLY_BYTES})   # no reply makes us allocate more


def advertised_endpoint(bound: str, gossip_listen: str | None = None) -> str:
    """The peer endpoint to gossip: the bound one, with a wildcard host (0.0.0.0, *, ::) replaced
    by the gossip address's host or else this host's address, since peers cannot dial a wildcard."""
    import socket
    rest = bound.removeprefix("tcp://")
    host, _, port = rest.rpartition(":")
    if host.strip("[]") not in ("0.0.0.0", "*", "::", ""):
        return bound
    gossip_host = (gossip_listen or "").rpartition(":")[0].strip("[]")
    if gossip_host and gossip_host not in ("0.0.0.0", "::"):
        host = gossip_host
    else:
        try:
            host = socket.gethostbyname(socket.gethostname())
        except OSError:
            host = "127.0.0.1"
    return f"tcp://{host}:{port}"
