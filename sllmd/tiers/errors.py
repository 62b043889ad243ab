"""Errors of the tiers and the node, with stable wire codes (append-only)."""
from __future__ import annotations

from ..errors import SllmError
from ..protocol.errors import ShuttingDownError  # one class per wire code

__all__ = ["InvalidNameError", "ModelExistsError", "ModelFailedError", "ModelInUseError", "ModelNotFoundError",
           "ShuttingDownError", "StoreFullError", "StoreLockedError"]


class ModelNotFoundError(SllmError):
    code = "model_not_found"


class ModelExistsError(SllmError):
    code = "model_exists"


class InvalidNameError(SllmError):
    code = "invalid_name"
    exit_code = 2


class ModelInUseError(SllmError):
    """The model is serving, queued or loading; it cannot be evicted or removed now."""

    code = "model_in_use"
    exit_code = 75


class StoreFullError(SllmError):
    """The SSD store has no room, even after evicting every unpinned idle model."""

    code = "store_full"


class StoreLockedError(SllmError):
    """Another daemon owns this store directory."""

    code = "store_locked"


class ModelFailedError(SllmError):
    """The model's checkpoint on disk is unusable (see `models` for the reason)."""

    code = "model_failed"
