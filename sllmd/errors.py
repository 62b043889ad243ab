"""Every error sllm raises, declared once, with its stable wire code and exit code.

The code travels in typed error replies over the wire (DESIGN.md section 6);
the client turns it back into the same exception class (`exception_from_reply`)
and `sllmctl` into an exit code. `CODES` is the append-only table: a new error
gets a new line at the end; a code is never renumbered, reused or removed.
Declaring a class whose code is not in the table, or is taken, fails at import.
"""
from __future__ import annotations

from enum import IntEnum


class Exit(IntEnum):
    """Process exit codes (sysexits where one fits); the README's table."""

    OK = 0
    ERROR = 1
    USAGE = 2            # a bad argument or request field: the caller's mistake
    UNAVAILABLE = 69     # EX_UNAVAILABLE: no daemon listens
    TEMPFAIL = 75        # EX_TEMPFAIL: busy or timed out, try again
    CONFIG = 78          # EX_CONFIG: the unit's RestartPreventExitStatus relies on it


# code -> number. Append only (memberlist's message-type enum is the model).
CODES: dict[str, int] = {
    "error": 0,
    "checkpoint": 1,
    "not_a_checkpoint": 2,
    "unsupported_version": 3,
    "corrupt_checkpoint": 4,
    "truncated_checkpoint": 5,
    "unsupported_tensor": 6,
    "conversion": 7,
    "load": 8,
    "load_cancelled": 9,
    "pool_exhausted": 10,
    "out_of_memory": 11,
    "config": 12,
    "protocol": 13,
    "bad_message": 14,
    "unknown_type": 15,
    "oversized": 16,
    "invalid_argument": 17,
    "version_mismatch": 18,
    "handshake_required": 19,
    "busy": 20,
    "shutting_down": 21,
    "cancelled": 22,
    "internal": 23,
    "unreachable": 24,
    "timeout": 25,
    "address_in_use": 26,
    "model_not_found": 27,
    "model_exists": 28,
    "invalid_name": 29,
    "model_in_use": 30,
    "store_full": 31,
    "store_locked": 32,
    "model_failed": 33,
    "invalid_request": 34,
    "instance_closed": 35,
    "inference": 36,
    "permission_denied": 37,
    "too_large": 38,
    "model_pinned": 39,
    "unservable_model": 40,
    "load_timeout": 41,
    "node_not_found": 42,
    "peer_failed": 43,
    "serf_rpc": 44,
    "unauthorized": 45,
    "request_not_found": 46,
    "repository": 47,
}

REGISTRY: dict[str, type["SllmError"]] = {}


class SllmError(Exception):
    """Base class. `code` is stable on the wire; `exit_code` is what sllmctl returns."""

    code = "error"
    exit_code: int = Exit.ERROR

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        code = cls.__dict__.get("code")
        if code is None:   # a subclass that keeps its parent's code (e.g. RemoteError sets it per instance)
            return
        if code not in CODES:
            raise TypeError(f"{cls.__name__}: error code {code!r} is not in sllmd.errors.CODES")
        if code in REGISTRY:
            raise TypeError(f"{cls.__name__}: error code {code!r} is taken by {REGISTRY[code].__name__}")
        REGISTRY[code] = cls


REGISTRY["error"] = SllmError


# --- checkpoints --------------------------------------------------------------
class CheckpointError(SllmError):
    """A checkpoint cannot be read or written."""

    code = "checkpoint"


class NotACheckpointError(CheckpointError):
    code = "not_a_checkpoint"


class UnsupportedVersionError(CheckpointError):
    code = "unsupported_version"


class CorruptCheckpointError(CheckpointError):
    """A checksum mismatch, an inconsistent index, or a malformed file."""

    code = "corrupt_checkpoint"


class TruncatedCheckpointError(CorruptCheckpointError):
    code = "truncated_checkpoint"


class UnsupportedTensorError(CheckpointError):
    code = "unsupported_tensor"


class ConversionError(SllmError):
    code = "conversion"


class UnservableModelError(CheckpointError):
    """An import whose config, weights and tokenizer do not make a model sllmd can serve."""

    code = "unservable_model"


# --- loader and memory --------------------------------------------------------
class LoadError(SllmError):
    code = "load"


class LoadCancelledError(LoadError):
    code = "load_cancelled"


class PoolExhaustedError(LoadError):
    """The DRAM chunk pool has too few free chunks for a request."""

    code = "pool_exhausted"
    exit_code = Exit.TEMPFAIL


class OutOfMemoryError(LoadError):
    """Not enough room now (the budget is held by busy instances); try again."""

    code = "out_of_memory"
    exit_code = Exit.TEMPFAIL


class LoadTimeoutError(LoadError):
    """A request waited longer than the node's load wait for its model's load; try again."""

    code = "load_timeout"
    exit_code = Exit.TEMPFAIL


class TooLargeError(LoadError):
    """Never fits: the model is larger than the whole budget of a tier. Permanent."""

    code = "too_large"


# --- configuration ------------------------------------------------------------
class ConfigError(SllmError):
    """A setting, flag or config file that cannot be used."""

    code = "config"
    exit_code = Exit.CONFIG


# --- protocol -----------------------------------------------------------------
class ProtocolError(SllmError):
    """A message broke the protocol."""

    code = "protocol"


class BadMessageError(ProtocolError):
    """A frame that is not a valid message: garbage, truncated msgpack, wrong field types."""

    code = "bad_message"


class UnknownTypeError(BadMessageError):
    """A well-formed message whose type this side does not know."""

    code = "unknown_type"


class OversizedError(BadMessageError):
    """A frame larger than the receiver's `max_frame_bytes`."""

    code = "oversized"


class InvalidArgumentError(BadMessageError):
    """A request the client refused to send: an argument fails the message's checks (a usage error)."""

    code = "invalid_argument"
    exit_code = Exit.USAGE


class VersionMismatchError(ProtocolError):
    """The two sides speak different protocol versions."""

    code = "version_mismatch"


class HandshakeRequiredError(ProtocolError):
    """A request arrived on a connection that has not said hello (e.g. after a daemon restart)."""

    code = "handshake_required"


class BusyError(SllmError):
    """A bounded queue is full; nothing was dropped, try again later."""

    code = "busy"
    exit_code = Exit.TEMPFAIL


class ShuttingDownError(SllmError):
    """The daemon is shutting down and takes no new requests."""

    code = "shutting_down"
    exit_code = Exit.TEMPFAIL


class CancelledError(SllmError):
    """The request was cancelled (by its client, or because the daemon stopped)."""

    code = "cancelled"


class InternalError(SllmError):
    """An unexpected failure inside the daemon (its log has the traceback)."""

    code = "internal"


class DaemonUnreachableError(SllmError):
    """No daemon listens on the socket, or it went away mid-request (raised by the client)."""

    code = "unreachable"
    exit_code = Exit.UNAVAILABLE


class DaemonTimeoutError(SllmError):
    """The daemon accepted the connection but sent no sign of life in time (raised by the client)."""

    code = "timeout"
    exit_code = Exit.TEMPFAIL


class AddressInUseError(SllmError):
    """Another daemon already listens on the socket."""

    code = "address_in_use"


class PermissionDeniedError(SllmError):
    """The requesting user may not do this (e.g. read the file an import names)."""

    code = "permission_denied"


# --- the store and the node ---------------------------------------------------
class ModelNotFoundError(SllmError):
    code = "model_not_found"


class ModelExistsError(SllmError):
    code = "model_exists"


class InvalidNameError(SllmError):
    code = "invalid_name"
    exit_code = Exit.USAGE


class ModelInUseError(SllmError):
    """The model is serving, queued or loading; it cannot be evicted or removed now."""

    code = "model_in_use"
    exit_code = Exit.TEMPFAIL


class ModelPinnedError(SllmError):
    """The model is pinned; removing it needs `--force` (or unpin it first)."""

    code = "model_pinned"


class StoreFullError(SllmError):
    """The SSD store has no room, even after evicting every unpinned idle model."""

    code = "store_full"


class StoreLockedError(SllmError):
    """Another daemon owns this store directory."""

    code = "store_locked"


class ModelFailedError(SllmError):
    """The model's checkpoint on disk is unusable (see `models` for the reason)."""

    code = "model_failed"


# --- inference ----------------------------------------------------------------
class InvalidRequestError(SllmError):
    """A request's fields are missing, of the wrong type, or out of range (e.g. a prompt longer than the context)."""

    code = "invalid_request"
    exit_code = Exit.ERROR


class InstanceClosedError(SllmError):
    """The instance stopped (evicted or shutting down) before the request finished."""

    code = "instance_closed"
    exit_code = Exit.TEMPFAIL


class InferenceError(SllmError):
    """The model failed while running a request."""

    code = "inference"


RequestCancelledError = CancelledError   # the inference path's name for the same wire code


# --- the cluster --------------------------------------------------------------
class NodeNotFoundError(SllmError):
    """`--node NAME` names no alive member of the cluster."""

    code = "node_not_found"
    exit_code = Exit.ERROR


class PeerFailedError(SllmError):
    """The node chosen for a request went away or broke its stream (after the first token, or with no other candidate)."""

    code = "peer_failed"
    exit_code = Exit.TEMPFAIL


class RequestNotFoundError(SllmError):
    """`migrate REQUEST_ID` names no request running on any node (or one that already finished)."""

    code = "request_not_found"
    exit_code = Exit.ERROR


class SerfRpcError(ConfigError):
    """Serf's agent refused a call or is unreachable (a configuration or host problem)."""

    code = "serf_rpc"


# --- model repositories --------------------------------------------------------
class RepositoryError(SllmError):
    """A model repository cannot be read: unreachable, a malformed index, a server that keeps
    failing (5xx, stalls) after the retries, or one that does not honour Range requests."""

    code = "repository"
    exit_code = Exit.TEMPFAIL


# --- the HTTP front end ---------------------------------------------------------
class UnauthorizedError(SllmError):
    """An HTTP request to /v1 without the key --api-key-file names (HTTP 401)."""

    code = "unauthorized"


class RemoteError(SllmError):
    """An error reply whose code this side has no class for; keeps the wire code and exit code."""

    def __init__(self, message: str, code: str, exit_code: int = Exit.ERROR):
        super().__init__(message)
        self.code = code
        self.exit_code = exit_code


def error_class_for(code: str) -> type[SllmError] | None:
    """The exception class declared with `code`, or None."""
    return REGISTRY.get(code)


def error_reply_fields(exc: BaseException) -> dict:
    """The code, message and exit code that describe `exc` on the wire."""
    if isinstance(exc, SllmError):
        return {"code": exc.code, "message": str(exc) or exc.__class__.__name__, "exit_code": int(exc.exit_code)}
    return {"code": InternalError.code, "message": f"internal error: {exc.__class__.__name__}: {exc}",
            "exit_code": int(InternalError.exit_code)}


def exception_from_reply(code: str, message: str, exit_code: int = Exit.ERROR) -> SllmError:
    """The exception an error reply stands for: its declared class, or a RemoteError with its code."""
    cls = error_class_for(code)
    if cls is None:
        return RemoteError(message, code, exit_code)
    exc = cls.__new__(cls)
    SllmError.__init__(exc, message)
    return exc
