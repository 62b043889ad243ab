"""Every error sllm raises, with a stable code.

The code travels in typed error replies over the wire (DESIGN.md section 6);
the client turns it back into the same exception class and `sllmctl` into an
exit code. Codes are append-only: never renumber or reuse one.
"""
from __future__ import annotations


class SllmError(Exception):
    """Base class. `code` is stable on the wire; `exit_code` is what sllmctl returns."""

    code = "error"
    exit_code = 1


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


# --- loader and memory --------------------------------------------------------
class LoadError(SllmError):
    code = "load"


class LoadCancelledError(LoadError):
    code = "load_cancelled"


class PoolExhaustedError(LoadError):
    """The DRAM chunk pool has too few free chunks for a request."""

    code = "pool_exhausted"
    exit_code = 75


class OutOfMemoryError(LoadError):
    code = "out_of_memory"
    exit_code = 75
