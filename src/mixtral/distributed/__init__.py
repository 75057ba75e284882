"""Tensor and expert parallelism over torch.distributed: one model across processes (GPUs) and hosts.

- ``config.py``: ParallelConfig (the layout) and each rank's share of the model;
- ``groups.py``: process groups from how the process was launched (spawned by the driver, or torchrun);
- ``sharded_loader.py``: each rank builds its shard and reads only its slices of the checkpoint;
- ``reduce.py``: the all-reduce hook after attention and after the MoE;
- ``protocol.py`` / ``status.py``: what the driver tells the workers, and how setup failures are reported;
- ``executor.py``: rank 0 — starts the workers (``processes.py``), loads, watches, stops;
- ``runner.py``: the ModelRunner the engine steps, running every call on every rank;
- ``worker.py``: ranks > 0 — the loop that follows the driver;
- ``engine.py``: an ``LLMEngine`` over a tensor-parallel group; ``memory.py``: each rank's share (``mixtral info``).

Design, launch examples and measurements: docs/PARALLEL.md.
"""

from mixtral.distributed.config import ParallelConfig
from mixtral.distributed.errors import ParallelConfigError, WorkerFailedError

__all__ = ["ParallelConfig", "ParallelConfigError", "WorkerFailedError"]
