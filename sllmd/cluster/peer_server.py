"""Both ends of the peer protocol (sllmd.cluster.peer_messages) over the peer socket.

    coordinator ── PeerClient (pooled CURVE connections) ══ peer socket ══► PeerServer ──► Node.infer
                   state() ──state_pull (delta since the last answer)──►    state_provider()

PeerServer is the daemon's request server (sllmd.server.Server: one I/O thread, heartbeats,
bounded stream threads, cancel on disconnect, typed errors for anything malformed) speaking
the peer registry instead of the client one. A peer_infer runs on this node only (never
placed again, so two nodes can never bounce a request between them). Admission is the
instance's bounded queue: a request that does not fit is refused at once with `busy`, before
any token, and the coordinator moves to the next candidate.

PeerClient keeps a small pool of connections to one peer: each call checks one out (a Curve
handshake is paid once per connection, not per request) and returns it when the call ended
cleanly; one that failed is closed.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Iterator

from sllmd.client import Client, InferStream, WatchStream
from sllmd.errors import BadMessageError, SllmError
from sllmd.protocol import Message, Result
from sllmd.server import Server

from .peer_messages import (PEER_LONG_RUNNING, PEER_PROTOCOL_VERSION, PeerAck, PeerCancel, PeerHello, PeerInfer,
                            PeerMigrate, PeerPark, PeerPrepare, PeerResume, PeerWatch, StatePull, decode_peer_reply,
                            decode_peer_request)
from .peer_transport import PeerTransport
from .state_delta import StateHistory, apply_delta

log = logging.getLogger(__name__)

PEER_TIMEOUT_S = 5.0       # silence (no reply, no heartbeat: they come every second) after which a peer has failed
MAX_IDLE_CONNECTIONS = 8   # per peer


class PeerServer(Server):
    """Serves state_pull and peer_infer to admitted members."""

    PROTOCOL = PEER_PROTOCOL_VERSION
    HELLO = PeerHello
    CANCEL = PeerCancel
    ACK = PeerAck
    LONG = PEER_LONG_RUNNING

    def __init__(self, node: Any, endpoint, state_provider, *, heartbeat_s: float = 1.0, max_streams: int = 64,
                 max_frame_bytes: int = 16 << 20, migrations: Any = None):
        self._state_provider = state_provider
        self._migrations = migrations   # sllmd.cluster.migration.Migrations: streams that can move
        self._history = StateHistory()
        super().__init__(node, endpoint, max_frame_bytes=max_frame_bytes, heartbeat_s=heartbeat_s,
                         max_streams=max_streams, control_workers=2)

    def _make_handlers(self):
        return {"state_pull": self._state_pull, "peer_infer": self._peer_infer, "peer_prepare": self._peer_prepare,
                "peer_park": self._peer_park,
                "peer_resume": self._peer_resume, "peer_migrate": self._peer_migrate, "peer_watch": self._watch,
                "peer_files": self._peer_files, "peer_read": self._peer_read, "peer_fetch": self._peer_fetch}

    def _decode(self, frame: bytes) -> Message:
        return decode_peer_request(frame, self.max_frame_bytes)

    def _state_pull(self, msg: StatePull, call) -> Message:
        version, state = self._state_provider()
        return Result(id=msg.id, data=self._history.answer(version, state, msg.since))

    def _peer_infer(self, msg: PeerInfer, call) -> Message:
        request = msg.to_request()
        log.debug("peer_infer %s for %s from %s", request.request_id, request.model, msg.origin or "?")
        if self._migrations is not None:
            return self._stream(msg, call, self._migrations.run(request, cancelled=call.cancelled))
        return self._stream(msg, call, self.node.infer(request, cancelled=call.cancelled))

    def _peer_prepare(self, msg: PeerPrepare, call) -> Message:
        info = self.node.load(msg.model, fetch=False)   # a migration never waits for a download
        return Result(id=msg.id, data={k: info.get(k) for k in ("name", "load_tier", "load_s", "state")})

    def _peer_park(self, msg: PeerPark, call) -> Message:
        return Result(id=msg.id, data=self.node.park(msg.model, msg.request_id, msg.token_ids))

    def _peer_resume(self, msg: PeerResume, call) -> Message:
        log.info("resuming request %s from %s", msg.state.get("request_id"), msg.origin or "?")
        if self._migrations is not None:
            return self._stream(msg, call, self._migrations.resume(msg.state, cancelled=call.cancelled))
        return self._stream(msg, call, self.node.resume(msg.state, cancelled=call.cancelled))

    def _peer_files(self, msg, call) -> Message:
        from sllmd.repository.peer import serve_files
        return Result(id=msg.id, data={"files": serve_files(self.node.ssd, msg.model)})

    def _peer_read(self, msg, call) -> Message:
        from sllmd.repository.peer import serve_read
        return Result(id=msg.id, data={"data": serve_read(self.node.ssd, msg.model, msg.path, msg.offset, msg.length)})

    def _peer_fetch(self, msg, call) -> tuple[bytes, bytes]:
        from sllmd.repository.peer import serve_read
        from .peer_data import fetch_reply   # the bytes as a frame of their own, not copied
        return fetch_reply(msg.id, serve_read(self.node.ssd, msg.model, msg.path, msg.offset, msg.length))

    def _peer_migrate(self, msg: PeerMigrate, call) -> Message:
        if self._migrations is None:
            raise BadMessageError("this node cannot migrate requests")
        return Result(id=msg.id, data=self._migrations.migrate(msg.request_id, msg.to, reason=msg.reason))


class _Connection(Client):
    """One CURVE connection speaking the peer protocol, with Client's machinery (ids, heartbeats,
    silence timeouts, cancel on close)."""

    def __init__(self, address: str, server_public: bytes, transport: PeerTransport, node_name: str,
                 timeout: float):
        self._server_public = server_public
        self._node_name = node_name
        super().__init__(socket=address, timeout=timeout, transport=transport, client_name=node_name)

    def _connect(self, explicit: bool):
        return self._transport.connect(self.address, self._server_public)

    def _hello_message(self, rid: int) -> Message:
        return PeerHello(id=rid, version=PEER_PROTOCOL_VERSION, node=self._node_name)

    def _cancel_message(self, rid: int) -> Message:
        return PeerCancel(id=rid)

    def _ack_message(self, rid: int, seq: int) -> Message:
        return PeerAck(id=rid, seq=seq)

    @staticmethod
    def _decode_reply(frame: bytes) -> Message:
        return decode_peer_reply(frame)

    from .peer_data import receive_one as _receive_one   # a peer_fetch's data frame, uncopied


class PeerClient:
    """Calls one peer: its state, and requests run there. Thread-safe."""

    def __init__(self, address: str, server_public: bytes, public: bytes, secret: bytes, *, node_name: str = "",
                 timeout: float = PEER_TIMEOUT_S):
        self.address = address
        self.server_public = server_public
        self.node_name = node_name
        self.timeout = timeout
        self._transport = PeerTransport(public, secret)
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._serial = 0                   # the serial of the last state answer (deltas start from it)
        self._state: dict | None = None
        self._closed = False
        self._out = 0                      # connections checked out (the context ends after the last)

    # --- the pool -------------------------------------------------------------------------------
    def _checkout(self) -> _Connection:
        with self._lock:
            if self._closed:
                raise BadMessageError("the peer client is closed")
            self._out += 1
            if self._idle:
                return self._idle.pop()
        try:
            return _Connection(self.address, self.server_public, self._transport, self.node_name, self.timeout)
        except BaseException:
            self._checkin(None, False)
            raise

    def _checkin(self, conn: _Connection | None, healthy: bool) -> None:
        with self._lock:
            self._out -= 1
            keep = healthy and not self._closed and len(self._idle) < MAX_IDLE_CONNECTIONS
            if keep:
                self._idle.append(conn)
            end = self._closed and self._out == 0
        if conn is not None and not keep:
            conn.close()
        if end:
            self._transport.close()

    # --- calls ------------------------------------------------------------------------------------
    def state(self) -> tuple[int, dict]:
        """(version, state) of the peer now; a delta from the last answer travels when it can."""
        with self._state_lock:
            conn = self._checkout()
            healthy = False
            try:
                data = conn._call(lambda i: StatePull(id=i, since=self._serial if self._state is not None else 0))
                healthy = True
            finally:
                self._checkin(conn, healthy)
            if not isinstance(data, dict) or not isinstance(data.get("version"), int) \
                    or not isinstance(data.get("serial"), int):
                raise BadMessageError("state_pull: the answer has no version and serial")
            if "delta" in data:
                if self._state is None or data.get("since") != self._serial:
                    raise BadMessageError("state_pull: a delta from a state this node does not hold")
                try:
                    state = apply_delta(self._state, data["delta"])
                except ValueError as e:
                    raise BadMessageError(f"state_pull: {e}") from None
            else:
                state = data.get("state")
            if not isinstance(state, dict):
                raise BadMessageError("state_pull: the state is not a map")
            self._serial, self._state = data["serial"], state
            return data["version"], state

    def infer(self, request: dict) -> Iterator[dict]:
        """Runs `request` (InferRequest.to_dict()'s map) on the peer: its events as Client.infer's
        (tokens with their index). Closing the iterator early cancels the request there."""
        return self._events(lambda i: PeerInfer.of(i, request, self.node_name))

    def _events(self, make) -> Iterator[dict]:
        conn = self._checkout()
        healthy = False
        stream = InferStream(conn, conn._stream(make))
        try:
            for event in stream.events():
                yield event
            healthy = stream.done
        except GeneratorExit:
            healthy = True     # closed early by the caller: the cancel went out, the connection is fine
            raise
        finally:
            stream.close()
            self._checkin(conn, healthy)

    def watch(self, interval_s: float = 0.5, max_events: int = 1000) -> Iterator[dict]:
        """The peer's own watch updates (sllmd.watch), each acknowledged as it is taken; closing
        the iterator ends the watch there."""
        conn = self._checkout()
        healthy = False
        try:
            replies = conn._stream(lambda i: PeerWatch(id=i, interval_s=interval_s, max_events=max_events))
            stream = WatchStream(conn, replies, next(replies))
        except BaseException:
            self._checkin(conn, False)
            raise
        try:
            while True:
                try:
                    update = next(stream)
                except StopIteration:
                    return
                yield update
        except GeneratorExit:
            healthy = True     # closed by the caller: the cancel went out, the connection is fine
            raise
        finally:
            stream.close()
            self._checkin(conn, healthy)

    def prepare(self, model: str) -> dict:
        """Live migration: the peer loads `model` (from its fastest path)."""
        return self._call(lambda i: PeerPrepare(id=i, model=model))

    def park(self, model: str, request_id: str, token_ids: list[int]) -> dict:
        """A live migration's round: the peer prefills these tokens of the request ahead of its handoff."""
        return self._call(lambda i: PeerPark(id=i, model=model, request_id=request_id, token_ids=list(token_ids)))

    def files(self, model: str) -> list[dict]:
        """Peer transfer: the files of the peer's copy of `model` (path, size, sha256)."""
        from .peer_messages import PeerFiles
        return self._call(lambda i: PeerFiles(id=i, model=model))["files"]

    def read(self, model: str, path: str, offset: int, length: int) -> bytes:
        """Peer transfer: up to `length` bytes (at most PEER_READ_MAX) of one of those files."""
        from .peer_messages import PeerRead
        return self._call(lambda i: PeerRead(id=i, model=model, path=path, offset=offset, length=length))["data"]

    def migrate(self, request_id: str, to: str, reason: str = "") -> dict:
        """Asks the peer, which runs `request_id`, to move it to node `to`."""
        return self._call(lambda i: PeerMigrate(id=i, request_id=request_id, to=to, reason=reason))

    def resume(self, state: dict) -> Iterator[dict]:
        """Live migration's handoff: the peer continues `state`; its events as infer's."""
        return self._events(lambda i: PeerResume(id=i, state=state, origin=self.node_name))

    def _call(self, make) -> Any:
        conn = self._checkout()
        healthy = False
        try:
            data = conn._call(make)
            healthy = True
            return data
        except SllmError:
            healthy = True     # an error reply: the connection is fine
            raise
        finally:
            self._checkin(conn, healthy)

    def close(self) -> None:
        """Closes the idle connections now; one in use closes when its call ends (so a close from
        another thread never blocks on a running stream)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            idle, self._idle = self._idle, []
            end = self._out == 0
        for conn in idle:
            conn.close()
        if end:
            self._transport.close()
