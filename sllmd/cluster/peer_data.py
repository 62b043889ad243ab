"""Peer transfer's data path: a peer_fetch reply is two ZeroMQ frames, a header and the bytes.

    PeerRemote ── peer_fetch(model, path, offset, length) ──► PeerServer: pread
               ◄── [result {"length": n}] [n raw bytes] ────┘

The bytes never pass through msgpack (peer_read packs them into the result: a copy to pack,
one to receive, one to unpack, each into freshly faulted-in pages). The server hands its pread
buffer to ZeroMQ as a frame of its own without a copy (copy=False), the client takes the
received frame without a copy and gives its memoryview to the download's sink (CRC-32C of
each block, pwrite). Only CurveZMQ's own encrypt/decrypt touch the bytes in between.

Checked on arrival, before a caller sees anything: the header is a validated `result` whose
data is exactly {"length": n}, the data frame is exactly n bytes, and n is at most what was
asked for. Anything else ends the call with bad_message (never a silent wait) and the
connection is dropped. No reply can make this node allocate without bound: the peer client's
socket refuses any message over peer_transport.MAX_REPLY_BYTES (ZeroMQ drops the connection first).
"""
from __future__ import annotations

import collections
import logging

from sllmd.errors import BadMessageError, DaemonTimeoutError, SllmError
from sllmd.protocol import Error, Result, encode, error_reply_fields
from sllmd.protocol.codec import peek_id

from .peer_messages import PEER_READ_MAX, PeerFetch, decode_peer_reply

log = logging.getLogger(__name__)



def fetch_reply(request_id: int, data: bytes) -> tuple[bytes, bytes]:
    """The server's frames for one peer_fetch: the header, then the bytes themselves."""
    return encode(Result(id=request_id, data={"length": len(data)})), data


def _refusal(rid: int | None, problem: str) -> Error:
    return Error(id=rid, **error_reply_fields(BadMessageError(f"peer_fetch reply: {problem}")))


def _check(frames: list) -> tuple[object, object | None]:
    """(reply message, data frame or None) of one received message; a malformed data reply
    becomes an error reply for its request."""
    if len(frames) == 1:
        return decode_peer_reply(frames[0].bytes), None
    head = frames[0].bytes
    if len(frames) != 2:
        return _refusal(peek_id(head), f"{len(frames)} frames, expected a header and the data"), None
    try:
        msg = decode_peer_reply(head, 1 << 16)
    except BadMessageError as e:
        return _refusal(getattr(e, "request_id", None), f"a malformed header: {e}"), None
    data = frames[1]
    length = msg.data.get("length") if isinstance(msg, Result) and isinstance(msg.data, dict) else None
    if not isinstance(length, int) or isinstance(length, bool) or set(msg.data) != {"length"}:
        return _refusal(msg.id, f"a {msg.TYPE} header without its length before a data frame"), None
    if len(data) != length or length > PEER_READ_MAX:
        return _refusal(msg.id, f"the header says {length} bytes, the data frame has {len(data)}"), None
    return msg, data


def receive_one(conn, timeout: float) -> bool:
    """Client._receive_one for a peer connection: as the client's, plus a fetch's data frame,
    kept (uncopied) for the call that asked for it."""
    frames = conn._ep.recv_frames(timeout)
    if frames is None:
        return False
    try:
        msg, data = _check(frames)
    except BadMessageError as e:
        log.warning("ignoring a malformed reply from a peer: %s", e)
        return True
    if msg.id is None:
        conn._orphan_errors.append(msg)
    elif msg.id in conn._open:
        if data is not None:
            payloads = conn.__dict__.setdefault("_payloads", {})   # ids of fetches in flight -> their data
            if msg.id not in payloads:
                msg = _refusal(msg.id, "a data frame for a request that asked for none")
            else:
                payloads[msg.id] = data
        conn._inbox.setdefault(msg.id, collections.deque()).append(msg)
    return True


def fetch(client, model: str, path: str, offset: int, length: int) -> memoryview:
    """Up to `length` bytes at `offset` of `path` of the peer's copy of `model`, as a view of the
    received frame (no copy). Raises as PeerClient's calls do; bad_message for a malformed reply."""
    conn = client._checkout()
    healthy = False
    try:
        payloads = conn.__dict__.setdefault("_payloads", {})
        rid = [0]

        def make(i: int) -> PeerFetch:
            payloads.pop(rid[0], None)
            rid[0] = i
            payloads[i] = None         # this request may receive a data frame
            return PeerFetch(id=i, model=model, path=path, offset=offset, length=length)

        try:
            conn._call(make)
        except (BadMessageError, DaemonTimeoutError):
            raise                      # malformed replies, or silence: drop this connection
        except SllmError:
            healthy = True             # an error reply: the connection is fine
            raise
        finally:
            data = payloads.pop(rid[0], None)
        if data is None:
            raise BadMessageError("peer_fetch reply: a result without its data frame")
        if len(data) > length:
            raise BadMessageError(f"peer_fetch reply: {len(data)} bytes, {length} were asked for")
        healthy = True
        return data.buffer
    finally:
        client._checkin(conn, healthy)
