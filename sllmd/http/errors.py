"""Every failure of an HTTP request as OpenAI's error body and an HTTP status.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "n", "code": "invalid_request"}}

`code` is sllm's stable error code (sllmd.errors.CODES), so a client can tell
`busy` from `out_of_memory`; `type` is OpenAI's coarse class; `param` names the
request field at fault where there is one. The status comes from one table
(`STATUS`, by error class, most specific first); an error that says "try again"
(exit code 75) and is not in the table is a 503 with Retry-After.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from sllmd import errors as E

# (error class, HTTP status); the first class the error is an instance of decides.
STATUS: tuple[tuple[type[E.SllmError], int], ...] = (
    (E.UnauthorizedError, 401),
    (E.PermissionDeniedError, 403),
    (E.ModelNotFoundError, 404),
    (E.NodeNotFoundError, 404),
    (E.OversizedError, 413),
    (E.BadMessageError, 400),          # malformed JSON, wrong field types (invalid_argument, unknown_type too)
    (E.InvalidRequestError, 400),      # a field out of range, an unsupported field, a prompt over the context
    (E.InvalidNameError, 400),
    (E.BusyError, 429),                # a bounded queue is full: nothing was dropped, retry
    (E.OutOfMemoryError, 429),         # busy instances hold the device budget now
    (E.PoolExhaustedError, 429),
    (E.ShuttingDownError, 503),
    (E.CancelledError, 499),           # nginx's "client closed request": nobody reads it
)

# OpenAI's `type` for each status (its API uses these words).
TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error", 499: "invalid_request_error",
         503: "service_unavailable_error"}

RETRY_AFTER_S = 1   # what a 429 or a temporary 503 tells the client to wait


@dataclass
class HttpError(Exception):
    """An error answer: status, OpenAI body fields and extra headers."""

    status: int
    message: str
    code: str
    param: str | None = None
    retry_after: int | None = None

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def body_bytes(self) -> bytes:
        return json.dumps(self.body(), separators=(",", ":")).encode()

    def headers(self) -> dict[str, str]:
        out = {}
        if self.retry_after is not None:
            out["Retry-After"] = str(self.retry_after)
        if self.status == 401:
            out["WWW-Authenticate"] = 'Bearer realm="sllmd"'
        return out


def status_of(exc: BaseException) -> int:
    if isinstance(exc, E.SllmError):
        for cls, status in STATUS:
            if isinstance(exc, cls):
                return status
        return 503 if exc.exit_code == E.Exit.TEMPFAIL else 500
    return 500


def http_error(exc: BaseException, param: str | None = None) -> HttpError:
    """The HTTP answer for `exc` (an HttpError as is; an SllmError by its class; anything else a 500)."""
    if isinstance(exc, HttpError):
        return exc
    status = status_of(exc)
    fields = E.error_reply_fields(exc)
    retry = RETRY_AFTER_S if status == 429 or (status == 503 and not isinstance(exc, E.ShuttingDownError)) else None
    return HttpError(status, fields["message"], fields["code"], param=param or getattr(exc, "param", None),
                     retry_after=retry)


def invalid(message: str, param: str | None = None) -> HttpError:
    """A 400 for a field of the request (its name in `param`)."""
    return HttpError(400, message, E.InvalidRequestError.code, param=param)
