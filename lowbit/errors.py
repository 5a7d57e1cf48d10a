"""The errors lowbit raises for problems its caller can fix.

Every one derives from `LowbitError`, and also from the built-in type that the
same problem would raise elsewhere (ValueError, TypeError, ...), so callers may
catch either. The command line prints a `LowbitError` as one line and exits
with status 1; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class LowbitError(Exception):
    """Base of every error lowbit reports about its input or environment."""


class UsageError(LowbitError, ValueError):
    """An argument, setting or input with a value lowbit cannot use."""


class UsageTypeError(LowbitError, TypeError):
    """An argument or input of the wrong type (or dtype)."""


class CheckpointError(LowbitError, ValueError):
    """A checkpoint that cannot be read: missing files, corrupt data, or contradictions."""


class CheckpointMismatchError(CheckpointError):
    """A resume or saliency directory that belongs to another model, data set or configuration."""


class CorruptCheckpointError(CheckpointError):
    """A resume or saliency file that cannot be read."""


class AssetError(LowbitError, RuntimeError):
    """The default model or a named text could not be fetched or prepared."""


class CalibrationError(LowbitError, FloatingPointError):
    """Calibration diverged (a non-finite loss) or met non-finite values."""
