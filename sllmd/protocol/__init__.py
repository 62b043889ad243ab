"""The sllmd wire protocol: typed messages, msgpack codec, protocol errors (DESIGN.md section 6)."""
from .codec import decode_reply, decode_request, encode, peek_id
from sllmd.errors import (BadMessageError, BusyError, CancelledError, DaemonTimeoutError, DaemonUnreachableError,
                     HandshakeRequiredError, InternalError, InvalidArgumentError, OversizedError, ProtocolError, RemoteError,
                     ShuttingDownError, UnknownTypeError, VersionMismatchError, error_reply_fields,
                     exception_from_reply)
from .messages import (LONG_RUNNING, PROTOCOL_VERSION, REPLIES, REQUESTS, Cancel, Done,
                       Error, Evict, Event, Heartbeat, Hello, Import, Infer, Load, Models, Pin, Ping, Progress, Ps,
                       Remove, Result, Show, Status, Token, Unpin, Welcome)
from .schema import Message

__all__ = [
    "BadMessageError", "BusyError", "Cancel", "CancelledError", "DaemonTimeoutError", "DaemonUnreachableError",
    "Done", "Error", "Event", "Evict", "HandshakeRequiredError", "Heartbeat", "Hello", "Import",
    "Infer", "InternalError", "InvalidArgumentError", "LONG_RUNNING", "Load", "Message", "Models", "OversizedError", "PROTOCOL_VERSION",
    "Pin", "Ping", "Progress", "ProtocolError", "Ps", "REPLIES", "REQUESTS", "RemoteError", "Remove", "Result",
    "Show", "ShuttingDownError", "Status", "Token", "UnknownTypeError", "Unpin", "VersionMismatchError",
    "Welcome", "decode_reply", "decode_request", "encode", "error_reply_fields", "exception_from_reply", "peek_id",
]
