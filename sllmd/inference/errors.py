"""Errors of the inference path, with stable wire codes (append-only)."""
from __future__ import annotations

from ..errors import SllmError
# One class per wire code: the protocol declares these, the inference path raises them.
from ..protocol.errors import BusyError, CancelledError as RequestCancelledError

__all__ = ["BusyError", "InferenceError", "InstanceClosedError", "InvalidRequestError", "RequestCancelledError"]


class InvalidRequestError(SllmError):
    """A request's fields are missing, of the wrong type, or out of range."""

    code = "invalid_request"
    exit_code = 2


class InstanceClosedError(SllmError):
    """The instance stopped (evicted or shutting down) before the request finished."""

    code = "instance_closed"
    exit_code = 75


class InferenceError(SllmError):
    """The model failed while running a request."""

    code = "inference"
