"""The errors tensor parallelism raises (no torch import here: the CLI's flags use them)."""

from __future__ import annotations


class ParallelConfigError(ValueError):
    """A parallel layout that the flags or the model's shapes do not allow."""


class WorkerFailedError(RuntimeError):
    """A rank of the tensor-parallel group failed or died; the group cannot run another step."""
