"""The one exception a bad checkpoint raises, so callers can tell it from a bug."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it stands: the message names the tensor and the file."""
