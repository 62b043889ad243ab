"""Errors that belong to the wire protocol, and the code -> exception mapping.

Every error reply carries a stable `code` (DESIGN.md section 6). The daemon
turns an exception into a reply with `error_reply_fields`; the client turns a
reply back into the same exception class with `exception_from_reply`. Codes
are append-only, like those in `sllmd.errors`: never renumber or reuse one.
"""
from __future__ import annotations

from sllmd.errors import SllmError

EXIT_UNAVAILABLE = 69   # sysexits EX_UNAVAILABLE: no daemon listens
EXIT_TEMPFAIL = 75      # sysexits EX_TEMPFAIL: busy or timed out, try again


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
    exit_code = 2


class VersionMismatchError(ProtocolError):
    """The two sides speak different protocol versions."""

    code = "version_mismatch"


class HandshakeRequiredError(ProtocolError):
    """A request arrived on a connection that has not said hello (e.g. after a daemon restart)."""

    code = "handshake_required"


class BusyError(SllmError):
    """A bounded queue is full; nothing was dropped, try again later."""

    code = "busy"
    exit_code = EXIT_TEMPFAIL


class ShuttingDownError(SllmError):
    """The daemon is shutting down and takes no new requests."""

    code = "shutting_down"
    exit_code = EXIT_TEMPFAIL


class CancelledError(SllmError):
    """The request was cancelled (by its client, or because the daemon stopped)."""

    code = "cancelled"


class InternalError(SllmError):
    """An unexpected failure inside the daemon (its log has the traceback)."""

    code = "internal"


class DaemonUnreachableError(SllmError):
    """No daemon listens on the socket, or it went away mid-request (raised by the client)."""

    code = "unreachable"
    exit_code = EXIT_UNAVAILABLE


class DaemonTimeoutError(SllmError):
    """The daemon accepted the connection but sent no sign of life in time (raised by the client)."""

    code = "timeout"
    exit_code = EXIT_TEMPFAIL


class AddressInUseError(SllmError):
    """Another daemon already listens on the socket."""

    code = "address_in_use"


class RemoteError(SllmError):
    """An error reply whose code this side has no class for; keeps the wire code and exit code."""

    code = "error"

    def __init__(self, message: str, code: str, exit_code: int = 1):
        super().__init__(message)
        self.code = code
        self.exit_code = exit_code


# Modules that declare error classes; imported on the first lookup so that a client maps every
# code to its class without loading the daemon's heavy parts (these modules are light).
ERROR_MODULES = ("sllmd.tiers.errors", "sllmd.inference.errors")
_imported = False


def _all_error_classes(base: type[SllmError] = SllmError):
    yield base
    for sub in base.__subclasses__():
        yield from _all_error_classes(sub)


def _import_error_modules() -> None:
    global _imported
    if _imported:
        return
    _imported = True
    import importlib
    for name in ERROR_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def error_class_for(code: str) -> type[SllmError] | None:
    """The exception class declared with `code`, or None.

    Looked up over the live subclass tree on every call, so error classes that
    other modules declare later (in `sllmd.errors` or elsewhere, once imported)
    are found too. Where two classes share a code, the one declared here wins.
    """
    _import_error_modules()
    for cls in _PROTOCOL_CLASSES:
        if cls.code == code:
            return cls
    for cls in _all_error_classes():
        if cls is RemoteError:
            continue
        if cls.__dict__.get("code") == code:
            return cls
    return None


def error_reply_fields(exc: BaseException) -> dict:
    """The code, message and exit code that describe `exc` on the wire."""
    if isinstance(exc, SllmError):
        return {"code": exc.code, "message": str(exc) or exc.__class__.__name__, "exit_code": exc.exit_code}
    return {"code": InternalError.code, "message": f"internal error: {exc.__class__.__name__}: {exc}",
            "exit_code": InternalError.exit_code}


def exception_from_reply(code: str, message: str, exit_code: int = 1) -> SllmError:
    """The exception an error reply stands for: its declared class, or a RemoteError with its code."""
    cls = error_class_for(code)
    if cls is None:
        return RemoteError(message, code, exit_code)
    try:
        exc = cls.__new__(cls)
        SllmError.__init__(exc, message)
    except Exception:  # a class with an unusual constructor: keep the code all the same
        return RemoteError(message, code, exit_code)
    return exc


_PROTOCOL_CLASSES = [cls for cls in list(globals().values())
                     if isinstance(cls, type) and issubclass(cls, SllmError) and cls.__module__ == __name__
                     and cls is not RemoteError]
