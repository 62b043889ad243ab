"""msgpack encoding of messages, and decoding that validates on arrival.

`decode_request` / `decode_reply` never let a malformed frame through: every
failure is a BadMessageError (or its subclasses UnknownTypeError,
OversizedError) carrying `request_id` when the frame's id could be read, so
the daemon can answer the request it belongs to.
"""
from __future__ import annotations

import dataclasses
import enum
import os
import threading
from typing import Any

import msgpack

from sllmd.errors import BadMessageError, OversizedError, UnknownTypeError
from .messages import MAX_ID, REPLIES, REQUESTS
from .schema import Message

# How deep a peer's msgpack may nest; our messages nest 4 levels at most.
_MAX_DEPTH = 32


def _to_plain(obj: Any) -> Any:
    """msgpack's fallback for values the daemon's core may hand back (paths, enums, sets, dataclasses)."""
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    raise TypeError(f"cannot encode {type(obj).__name__} on the wire")


_packers = threading.local()   # a Packer per thread: msgpack.packb builds one per call, ~10x the cost of a small pack


def pack(value: Any) -> bytes:
    """One value as `encode` writes it inside a message."""
    packer = getattr(_packers, "packer", None)
    if packer is None:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True, default=_to_plain, datetime=False)
    try:
        return packer.pack(value)
    except BaseException:
        packer.reset()   # a failed pack leaves a partial buffer behind
        raise


def encode(msg: Message) -> bytes:
    return pack(msg.to_fields())


_RESULT_HEAD = b"\x83" + pack("type") + pack("result") + pack("id")
_DATA_KEY = pack("data")


def encode_packed_result(request_id: int, packed_data: bytes) -> bytes:
    """The bytes of `encode(Result(id=request_id, data=...))` around data (not None) that is already packed."""
    if not (isinstance(request_id, int) and 0 <= request_id <= MAX_ID):
        raise BadMessageError(f"request id {request_id!r} is out of range")
    return _RESULT_HEAD + pack(request_id) + _DATA_KEY + packed_data


def _depth(obj: Any, level: int = 0) -> int:
    if level > _MAX_DEPTH:
        return level
    if isinstance(obj, dict):
        return max((_depth(v, level + 1) for v in obj.values()), default=level + 1)
    if isinstance(obj, list):
        return max((_depth(v, level + 1) for v in obj), default=level + 1)
    return level


def peek_id(frame: bytes) -> int | None:
    """The request id of a frame that may be invalid or oversized, if its first keys show one.

    Reads only the head of the frame: our encoder writes "type" then "id" first.
    """
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=1 << 16)
    unpacker.feed(frame[:4096])
    try:
        n = unpacker.read_map_header()
        for _ in range(min(n, 3)):
            key = unpacker.unpack()
            value = unpacker.unpack()
            if key == "id":
                if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_ID:
                    return value
                return None
    except Exception:
        return None
    return None


def decode_with(frame: bytes, registry: dict[str, type[Message]], other: dict[str, type[Message]],
                max_bytes: int | None) -> Message:
    """A message of `registry`, validated; one of `other` (the opposite direction, or another
    socket's registry) is refused by name, anything else as unknown."""
    if not isinstance(frame, bytes | bytearray | memoryview):
        raise BadMessageError(f"a frame must be bytes, not {type(frame).__name__}")
    if max_bytes is not None and len(frame) > max_bytes:
        err = OversizedError(f"frame of {len(frame)} bytes exceeds the limit of {max_bytes} bytes")
        err.request_id = peek_id(bytes(frame))
        raise err
    try:
        obj = msgpack.unpackb(frame, raw=False, strict_map_key=True, use_list=True,
                              ext_hook=_refuse_ext, timestamp=0)
    except Exception as e:
        err = BadMessageError(f"not a msgpack message: {e.__class__.__name__}: {e}")
        err.request_id = peek_id(bytes(frame))
        raise err from None
    request_id = obj.get("id") if isinstance(obj, dict) else None
    if not (isinstance(request_id, int) and not isinstance(request_id, bool) and 0 <= request_id <= MAX_ID):
        request_id = None
    try:
        if not isinstance(obj, dict):
            raise BadMessageError(f"a message must be a map, not {type(obj).__name__}")
        if _depth(obj) > _MAX_DEPTH:
            raise BadMessageError(f"message nests deeper than {_MAX_DEPTH} levels")
        fields = dict(obj)
        kind = fields.pop("type", None)
        if not isinstance(kind, str):
            raise BadMessageError("a message needs a string 'type' field first")
        cls = registry.get(kind)
        if cls is None:
            if kind in other:
                raise UnknownTypeError(f"'{kind}' is not accepted in this direction")
            raise UnknownTypeError(f"unknown message type '{kind:.64}'")
        return cls.from_fields(fields)
    except BadMessageError as err:
        err.request_id = request_id
        raise
    except TypeError as e:  # e.g. a dataclass refusing a field name that is not an identifier
        err = BadMessageError(f"malformed message: {e}")
        err.request_id = request_id
        raise err from None


def _refuse_ext(code: int, data: bytes):
    raise ValueError(f"msgpack extension type {code} is not part of the protocol")


def decode_request(frame: bytes, max_bytes: int | None = None) -> Message:
    """A client -> daemon message, validated."""
    return decode_with(frame, REQUESTS, REPLIES, max_bytes)


def decode_reply(frame: bytes, max_bytes: int | None = None) -> Message:
    """A daemon -> client message, validated."""
    return decode_with(frame, REPLIES, REQUESTS, max_bytes)
