"""The peer protocol: what one sllmd may ask another over the peer socket, declared once.

A registry of its own, built with the client protocol's machinery (sllmd.protocol.schema):
every message typed and validated on arrival. The two registries never mix: the client
socket decodes only client requests (a peer message there is an unknown type) and the peer
socket only these (a client request there is refused by name), so a local client can never
send a peer message and a peer can never send a client-only one. Type names are
append-only. Replies reuse the client protocol's shapes (welcome, result, token with its
index, event, done, heartbeat, error): a relayed stream is the same stream.

    peer_hello -> welcome                 (first, on every connection; PEER_PROTOCOL_VERSION)
    state_pull -> result {"version", "serial", "state"} | {"version", "serial", "since", "delta"}
    peer_infer -> (token | event)* -> done | error     (admitted or refused at once: busy)
    peer_cancel                           (no reply: the cancelled request ends with an error)
    peer_prepare -> result                (live migration: the destination loads the model)
    peer_park    -> result                (a round: the destination prefills the tokens so far)
    peer_resume  -> (token | event)* -> done | error   (the handoff: continue a request state here)
    peer_migrate -> result                (move a request this node runs to another node)
    peer_watch   -> update*               (this node's watch stream, sllmd.watch; peer_ack each update)
    peer_ack                              (no reply: the caller took a peer_watch's updates up to seq)
    peer_files   -> result {"files": [{"path", "size", "sha256"}]}   (a checkpoint this node holds)
    peer_read    -> result {"data": bytes}  (up to PEER_READ_MAX bytes of one of its files)
    peer_fetch   -> result {"length": n} + a frame of n raw bytes   (peer_read without msgpack
                                          around the bytes: sllmd.cluster.peer_data)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sllmd.errors import BadMessageError, InvalidRequestError
from sllmd.inference.request import InferRequest
from sllmd.protocol import codec
from sllmd.protocol.messages import MAX_ID, REPLIES, REQUESTS, Envelope, InferFields, WatchFields
from sllmd.protocol.schema import Message, at_least, checked, in_range, max_len, model_name

PEER_PROTOCOL_VERSION = 1
PEER_READ_MAX = 8 << 20   # one peer_read's bytes: well inside a frame (max_frame, 16 MiB by default)

PEER_REQUESTS: dict[str, type[Message]] = {}
# Replies are the client protocol's own classes: the same shapes travel back.
PEER_REPLIES: dict[str, type[Message]] = {name: REPLIES[name] for name in
                                          ("welcome", "result", "token", "event", "done", "heartbeat", "error",
                                                        "update")}
_CLIENT_MESSAGES = {**REQUESTS, **REPLIES}


def non_empty_ids(ids) -> str | None:
    if not ids:
        return "must not be empty"
    return None if all(0 <= t < 1 << 31 for t in ids) else "holds an id out of range"


def peer_request(name: str):
    """Declares a peer -> peer request."""
    def register(cls):
        if name in PEER_REQUESTS or name in _CLIENT_MESSAGES:
            raise TypeError(f"peer message type {name!r} declared twice (or shadows a client message)")
        cls.TYPE = name
        PEER_REQUESTS[name] = cls
        return cls
    return register


@peer_request("peer_hello")
@dataclass(frozen=True, kw_only=True)
class PeerHello(Envelope):
    version: int
    node: str = checked(max_len(200), default="")     # the caller's node name, for logs


@peer_request("state_pull")
@dataclass(frozen=True, kw_only=True)
class StatePull(Envelope):
    """This node's locality state; `since`: the serial of the answer the caller holds (0: none),
    so the answer may be a delta from it (sllmd.cluster.state_delta)."""

    since: int = checked(at_least(0), default=0)


@peer_request("peer_infer")
@dataclass(frozen=True, kw_only=True)
class PeerInfer(InferFields):
    """Runs a request placed here by `origin` (the coordinating node), streaming its events.
    The fields are InferRequest's wire map (request_id kept, so every node names it alike)."""

    raw: bool = False
    request_id: str | None = checked(max_len(128), default=None)
    origin: str = checked(max_len(200), default="")

    def check(self) -> None:
        try:
            self.to_request()
        except InvalidRequestError as e:
            raise BadMessageError(f"peer_infer: {e}") from None

    def to_request(self) -> InferRequest:
        fields = {k: v for k, v in self.to_fields().items() if k not in ("type", "id", "origin")}
        return InferRequest.from_dict(fields)

    @classmethod
    def of(cls, rid: int, request: dict, origin: str) -> "PeerInfer":
        """From InferRequest.to_dict()'s map."""
        stop = request.get("stop")
        return cls(id=rid, model=request["model"], prompt=request.get("prompt"), messages=request.get("messages"),
                   raw=bool(request.get("raw", False)), max_tokens=request.get("max_tokens"),
                   temperature=request.get("temperature"), top_p=request.get("top_p"), seed=request.get("seed"),
                   stop=list(stop) if stop else None, keep_alive=request.get("keep_alive"),
                   request_id=request.get("request_id"), origin=origin)


@peer_request("peer_cancel")
@dataclass(frozen=True, kw_only=True)
class PeerCancel(Envelope):
    """Cancels the in-flight request with this id on this connection."""


@peer_request("peer_prepare")
@dataclass(frozen=True, kw_only=True)
class PeerPrepare(Envelope):
    """Live migration, first step on the destination: load `model` from its fastest path here."""

    model: str = checked(model_name)


@peer_request("peer_park")
@dataclass(frozen=True, kw_only=True)
class PeerPark(Envelope):
    """Live migration's round: prefill this running request's tokens so far here (only what the
    last round did not cover), so that the handoff leaves little to prefill."""

    model: str = checked(model_name)
    request_id: str = checked(max_len(128))
    token_ids: list[int] = checked(non_empty_ids)


@peer_request("peer_resume")
@dataclass(frozen=True, kw_only=True)
class PeerResume(Envelope):
    """Live migration's handoff: continue this request state (RequestState.to_dict()) here, inside
    the running batch, streaming only what comes after it."""

    state: dict[str, Any]
    origin: str = checked(max_len(200), default="")

    def check(self) -> None:
        from sllmd.inference.request import RequestState
        try:
            RequestState.from_dict(self.state)
        except InvalidRequestError as e:
            raise BadMessageError(f"peer_resume: {e}") from None


@peer_request("peer_migrate")
@dataclass(frozen=True, kw_only=True)
class PeerMigrate(Envelope):
    """Asks the node running `request_id` to move it to node `to` (sllmctl migrate, reaching
    another node first)."""

    request_id: str = checked(max_len(128))
    to: str = checked(max_len(200))
    reason: str = checked(max_len(200), default="")   # why (the scheduler's migration option says for whom)


@peer_request("peer_watch")
@dataclass(frozen=True, kw_only=True)
class PeerWatch(WatchFields):
    """This node's own watch stream (its snapshot and events, as a local `watch` without `cluster`)."""


@peer_request("peer_ack")
@dataclass(frozen=True, kw_only=True)
class PeerAck(Envelope):
    """The caller has taken peer_watch `id`'s updates up to `seq` (its flow control). No reply."""

    seq: int = checked(in_range(0, MAX_ID))


@peer_request("peer_files")
@dataclass(frozen=True, kw_only=True)
class PeerFiles(Envelope):
    """Peer transfer: the files of `model`'s checkpoint here, with sizes and SHA-256 (as a
    repository index lists them, so the caller downloads it the same way)."""

    model: str = checked(model_name)


@peer_request("peer_read")
@dataclass(frozen=True, kw_only=True)
class PeerRead(Envelope):
    """Peer transfer: `length` bytes at `offset` of the file `path` of `model`'s checkpoint."""

    model: str = checked(model_name)
    path: str = checked(max_len(255))
    offset: int = checked(at_least(0))
    length: int = checked(in_range(1, PEER_READ_MAX))


@peer_request("peer_fetch")
@dataclass(frozen=True, kw_only=True)
class PeerFetch(Envelope):
    """Peer transfer: as peer_read, but the bytes come back as a frame of their own after the
    result (sllmd.cluster.peer_data), never copied into or out of msgpack."""

    model: str = checked(model_name)
    path: str = checked(max_len(255))
    offset: int = checked(at_least(0))
    length: int = checked(in_range(1, PEER_READ_MAX))


# Requests that may run for long: each gets a stream thread (bounded by the server's max_streams).
PEER_LONG_RUNNING = frozenset({"peer_infer", "peer_prepare", "peer_park", "peer_resume", "peer_migrate",
                               "peer_watch", "peer_files", "peer_read", "peer_fetch"})


def decode_peer_request(frame: bytes, max_bytes: int | None = None) -> Message:
    """A peer request, validated; a client message is refused by name."""
    return codec.decode_with(frame, PEER_REQUESTS, _CLIENT_MESSAGES, max_bytes)


def decode_peer_reply(frame: bytes, max_bytes: int | None = None) -> Message:
    return codec.decode_with(frame, PEER_REPLIES, PEER_REQUESTS, max_bytes)
