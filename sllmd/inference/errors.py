"""Errors of the inference path, with stable wire codes (append-only)."""
from __future__ import annotations

from ..errors import SllmError


class InvalidRequestError(SllmError):
    """A request's fields are missing, of the wrong type, or out of range."""

    code = "invalid_request"
    exit_code = 2


class BusyError(SllmError):
    """An instance's request queue is full; retry later."""

    code = "busy"
    exit_code = 75


class RequestCancelledError(SllmError):
    code = "cancelled"


class InstanceClosedError(SllmError):
    """The instance stopped (evicted or shutting down) before the request finished."""

    code = "instance_closed"
    exit_code = 75


class InferenceError(SllmError):
    """The model failed while running a request."""

    code = "inference"
