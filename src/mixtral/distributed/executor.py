"""The driver side of tensor / expert parallelism: rank 0 starts (or joins) the workers and runs the engine's steps.

``DistributedExecutor.start(model, parallel, ...)`` spawns ``tensor_parallel_size - 1`` worker processes on this
host (``python -m mixtral.distributed.worker``), or joins the ranks ``torchrun`` started, loads rank 0's shard and
has every worker load its own. ``make_runner(model, config, sampler)`` has ModelRunner's constructor signature and
returns a ``DistributedModelRunner`` (runner.py): the object the engine steps instead of a ``ModelRunner``. The
engine keeps its one scheduler; per step the driver

1. broadcasts one control message (protocol.py: per sequence what changed since the last step, a few int64
   per decode sequence) over the gloo control group;
2. when the step was launched ahead of its inputs (async scheduling), broadcasts the previous step's sampled ids
   from the device over the model group (NCCL), so no rank waits for the host to see them;
3. runs its own ``ModelRunner.launch``: the forward pass, whose all-reduces pair with the workers', then the
   sampling, on rank 0 only (after the last all-reduce every rank holds the same hidden states; rank 0's
   replicated lm_head turns them into logits).

Faults. A spawned worker that exits (killed, an exception, out of memory) is seen at once by a thread waiting on
it: the executor records which rank died and how (its last words come through a pipe), kills the other workers
(which also aborts any collective the driver is blocked in) and, with ``exit_on_worker_failure``, prints the
reason and exits the process with status 1 after ``EXIT_GRACE_S``; otherwise every later call raises
``WorkerFailedError`` naming the rank. Every wait of the driver on a collective is bounded by
``collective_timeout_s``. An error on rank 0 between the step's broadcast and the end of its forward pass leaves
the ranks out of step: it too marks the group failed. ``shutdown()`` (also at interpreter exit) stops the workers
and reaps them; a worker whose driver disappears exits by itself.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from mixtral.distributed.config import ParallelConfig
from mixtral.distributed.groups import DistributedInit, ProcessGroups, init_process_groups
from mixtral.distributed.processes import WorkerProcess, join_watching, reap, spawn_worker
from mixtral.distributed.protocol import Command, ControlChannel, command_message, json_message
from mixtral.distributed.reduce import install_all_reduce, time_all_reduce
from mixtral.distributed.status import RankStatus, WorkerFailedError, exchange_status, raise_failures

if TYPE_CHECKING:
    from mixtral.distributed.runner import DistributedModelRunner
    from mixtral.engine.config import EngineConfig
    from mixtral.engine.sampler import Sampler
    from mixtral.kernels.config import KernelConfig

logger = logging.getLogger("mixtral.distributed")

EXIT_GRACE_S = 1.0  # between seeing a dead worker and exiting (exit_on_worker_failure): /health says so
_FAILURE_WAIT_S = 3.0  # a collective error waits this long for the watcher to name the dead rank


@dataclass(frozen=True)
class WorkerFailure:
    rank: int
    pid: int | None
    cause: str

    def __str__(self) -> str:
        pid = f" (pid {self.pid})" if self.pid is not None else ""
        return f"tensor-parallel worker rank {self.rank}{pid} {self.cause}"


class DistributedExecutor:
    """Rank 0 of a tensor-parallel group. Create with :meth:`start`."""

    _active: DistributedExecutor | None = None  # one group per process (torch.distributed's default group)

    def __init__(self, parallel: ParallelConfig, groups: ProcessGroups, workers: list[WorkerProcess],
                 source: Any) -> None:
        self.parallel = parallel
        self.groups = groups
        self.source = source
        self.channel = ControlChannel(groups.control)
        self.model: torch.nn.Module | None = None
        # The engine's shutdown stops the group (an engine that started it); False: the group outlives engines
        # built over it one after another (tests, benchmarks).
        self.stop_with_engine = False
        self._workers = workers
        self._failure: WorkerFailure | None = None
        self._failed = threading.Event()
        self._stopping = False
        self._closed = False
        self._lock = threading.Lock()
        self._listeners: list[Callable[[WorkerFailure], None]] = []
        for w in workers:
            threading.Thread(target=self._watch, args=(w,), daemon=True, name=f"mixtral-watch-rank{w.rank}").start()

    # ----------------------------------------------------------------- start
    @classmethod
    def start(cls, model: str, parallel: ParallelConfig, device: torch.device | str | None = None,
              dtype: torch.dtype | str | None = None, *, seed: int = 0, allow_pickle: bool = False,
              progress: bool | None = None, quantization: str | None = None,
              kernels: KernelConfig | None = None) -> DistributedExecutor:
        """Start the group for ``model`` (a folder, preset, "demo" or Hub repo id) and load every rank's shard.

        On one host the workers are child processes; under ``torchrun`` this must be rank 0 (cli/parallel_args.py
        sends the other ranks to the worker loop). ``device``: "cuda" (rank r uses cuda:r on its host) or "cpu".
        ``quantization`` / ``kernels``: as ``load_model``'s (every rank quantizes its own slices).
        """
        from mixtral.checkpoint.loader import parse_dtype, resolve
        from mixtral.distributed.sharded_loader import load_shard
        from mixtral.engine.loading import default_device, default_dtype

        if not parallel.is_distributed:
            raise ValueError("DistributedExecutor needs tensor_parallel_size > 1; use ModelRunner for one process")
        if cls._active is not None:
            raise RuntimeError("a tensor-parallel group is already running in this process; shut it down first")
        source = resolve(model)
        parallel.check_model(source.args)
        dev = torch.device(device) if device is not None else default_device()
        if dev.index not in (None, 0):
            raise ValueError(f"with tensor parallelism rank r uses cuda:r of its host; got device {dev} (choose the "
                             "GPUs with CUDA_VISIBLE_DEVICES instead)")
        torch_dtype = parse_dtype(dtype) if dtype is not None else default_dtype(dev)
        init = DistributedInit.from_env()
        workers: list[WorkerProcess] = []
        if init is not None:  # torchrun started every rank
            if init.world_size != parallel.world_size or init.rank != 0:
                raise RuntimeError(f"torchrun rank {init.rank} of {init.world_size} cannot drive a group of "
                                   f"{parallel.world_size}: --nnodes x --nproc-per-node must equal "
                                   f"--tensor-parallel-size, and only rank 0 drives")
            groups = init_process_groups(init, dev.type, parallel.collective_timeout_s)
        else:
            store = dist.TCPStore("127.0.0.1", 0, parallel.world_size, is_master=True,
                                  timeout=timedelta(seconds=parallel.collective_timeout_s), wait_for_workers=False)
            workers = [spawn_worker(r, parallel, store.port, dev.type) for r in range(1, parallel.world_size)]
            init = DistributedInit(0, parallel.world_size, 0, "127.0.0.1", store.port, "spawn")
            try:
                groups = join_watching(init, dev.type, parallel, store, workers)
            except BaseException:
                reap(workers, kill=True)
                raise
        ex = cls(parallel, groups, workers, source)
        cls._active = ex
        atexit.register(_shutdown_at_exit, weakref.ref(ex))
        # Workers resolve the name themselves: a Hub repo through their own cache, a folder by its path.
        name = str(model) if source.repo_id is None else source.repo_id
        try:
            ex._load(name, dev.type, torch_dtype, seed, allow_pickle,
                     lambda: load_shard(source, parallel, 0, groups.device, torch_dtype, seed=seed,
                                        allow_pickle=allow_pickle, progress=progress, quantization=quantization,
                                        kernels=kernels).model,
                     {"quantization": quantization,
                      "kernels": dataclasses.asdict(kernels) if kernels is not None else None})
        except BaseException:
            ex.shutdown()
            raise
        return ex

    def _load(self, model: str, device_type: str, dtype: torch.dtype, seed: int, allow_pickle: bool,
              load_own: Callable[[], torch.nn.Module], extra: dict | None = None) -> None:
        payload = {"model": model, "device_type": device_type, "dtype": str(dtype).removeprefix("torch."),
                   "seed": seed, "allow_pickle": allow_pickle, "threads": torch.get_num_threads(),
                   "parallel": dataclasses.asdict(self.parallel), **(extra or {})}
        with self._collective("sending the load command"):
            self.channel.send(json_message(Command.LOAD, payload))
        error = None
        try:
            own = load_own()
            install_all_reduce(own, self.groups.model)
            self.model = own
        except Exception as exc:  # every rank must still hear how the load went
            error = f"{type(exc).__name__}: {exc}"
        with self._collective("loading the model"):
            statuses = exchange_status(self.groups.control, error)
        self._raise_failures(statuses, f"loading {model} ({self.parallel.describe()})")

    # ----------------------------------------------------------------- the engine's side
    @property
    def device(self) -> torch.device:
        return self.groups.device

    @property
    def dtype(self) -> torch.dtype:
        return self._model().dtype  # type: ignore[return-value]

    def make_runner(self, model: torch.nn.Module, config: EngineConfig, sampler: Sampler) -> DistributedModelRunner:
        """ModelRunner's signature: the runner the engine steps. ``model`` must be this executor's ``model``
        (rank 0's shard); ``config`` a resolved EngineConfig, sent to every worker."""
        from mixtral.engine.model_runner import ModelRunner

        if model is not self.model:
            raise ValueError("the engine must run the executor's own shard (DistributedExecutor.model)")
        payload = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
                   if f.name not in ("device", "dtype")}
        payload["kernels"] = dataclasses.asdict(config.kernels)  # a nested config: sent as its fields
        local = None
        error = None
        with self._collective("building the model runners"):
            self.channel.send(json_message(Command.INIT_RUNNER, payload))
            try:
                local = ModelRunner(model, config, sampler)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            statuses = exchange_status(self.groups.control, error)
        self._raise_failures(statuses, "building the model runners")
        assert local is not None
        from mixtral.distributed.runner import DistributedModelRunner

        return DistributedModelRunner(self, local)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] of a dense forward over ``input_ids`` [B, T] (no cache) on every rank; rank 0's."""
        b, t = input_ids.shape
        msg = torch.cat([command_message(Command.FORWARD, b, t), input_ids.reshape(-1).to("cpu", torch.int64)])
        with self._collective("a forward pass"), torch.inference_mode():
            self.channel.send(msg)
            return self._model()(input_ids.to(self.device))

    def bench_all_reduce(self, sizes: list[int], iters: int = 20) -> dict[int, float]:
        """Median seconds of one [n, dim] all-reduce in the model dtype for each n, timed on every rank at once."""
        with self._collective("timing all-reduces"):
            self.channel.send(command_message(Command.BENCH_ALL_REDUCE, iters, len(sizes), *sizes))
            model = self._model()
            return time_all_reduce(self.groups.model, sizes, model.args.dim, model.dtype, self.device, iters)

    def setup_command(self, cmd: Command, value: int, what: str, own: Callable[[], int]) -> list[int]:
        """Run a setup command on every rank (``own`` on this one); each rank's returned value, rank order."""
        error, mine = None, 0
        with self._collective(what):
            self.channel.send(command_message(cmd, value))
            try:
                mine = own()
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            statuses = exchange_status(self.groups.control, error, mine)
        self._raise_failures(statuses, what)
        return [s.value for s in statuses]

    # ----------------------------------------------------------------- faults
    def _raise_failures(self, statuses: list[RankStatus], what: str) -> None:
        """After a setup command some rank failed: every worker leaves its loop, so the group is done."""
        try:
            raise_failures(statuses, what)
        except WorkerFailedError:
            first = next(s for s in statuses if s.error is not None)
            self._fail(WorkerFailure(first.rank, None, f"failed {what}: {first.error}"), exit_process=False)
            raise

    @property
    def failure(self) -> WorkerFailure | None:
        return self._failure

    @property
    def healthy(self) -> bool:
        return self._failure is None and not self._closed

    def add_failure_listener(self, listener: Callable[[WorkerFailure], None]) -> None:
        """``listener(failure)`` runs on the watcher thread when a worker dies (e.g. a server marks itself down)."""
        self._listeners.append(listener)

    def check(self) -> None:
        if self._failure is not None:
            raise WorkerFailedError(str(self._failure))
        if self._closed:
            raise WorkerFailedError("the tensor-parallel group was shut down")

    @contextlib.contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        """Around every exchange with the workers: a failed collective becomes ``WorkerFailedError`` naming the
        rank that died (the watcher usually knows within milliseconds)."""
        self.check()
        try:
            yield
        except WorkerFailedError:
            raise
        except Exception as exc:
            raise self.failed_from(exc, what) from exc

    def failed_from(self, exc: BaseException, what: str) -> WorkerFailedError:
        """The error to raise for ``exc`` from an exchange with the workers: the dead worker's, when the watcher
        names one in time; else rank 0's own, which leaves the ranks out of step, so the group fails too."""
        if self._failed.wait(_FAILURE_WAIT_S if self._workers else 0.0):
            return WorkerFailedError(f"{self._failure} while {what}")
        self._fail(WorkerFailure(0, os.getpid(), f"(the driver) failed while {what}: {type(exc).__name__}: {exc}"))
        return WorkerFailedError(f"{self._failure}")

    def _fail(self, failure: WorkerFailure, exit_process: bool = True) -> None:
        """Record the group's first failure, kill the workers, tell the listeners and (``exit_on_worker_failure``)
        exit the process. ``exit_process`` False: a setup command failed, and its caller raises instead."""
        with self._lock:
            if self._failure is not None or self._stopping:
                return
            self._failure = failure
        logger.error("%s; stopping the tensor-parallel group", failure)
        self._failed.set()
        reap(self._workers, kill=True)
        for listener in self._listeners:
            try:
                listener(failure)
            except Exception:
                logger.exception("worker-failure listener failed")
        if exit_process and self.parallel.exit_on_worker_failure:
            threading.Thread(target=_exit_after, args=(failure,), daemon=True, name="mixtral-exit").start()

    def _watch(self, w: WorkerProcess) -> None:
        code = w.proc.wait()
        if self._stopping:
            return
        words = w.last_words()
        if code < 0:
            cause = f"was killed by signal {-code}"
        else:
            cause = f"exited with status {code}"
        if words:
            cause += f": {words}"
        self._fail(WorkerFailure(w.rank, w.proc.pid, cause))

    # ----------------------------------------------------------------- stop
    def shutdown(self) -> None:
        """Stop every worker (STOP, then a kill after ``_STOP_WAIT_S``), reap them and leave the group."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            alive = self._failure is None
            self._stopping = True
        if alive:
            with contextlib.suppress(Exception):
                self.channel.send(command_message(Command.STOP))
        reap(self._workers, kill=not alive)
        with contextlib.suppress(Exception):
            self.groups.destroy()
        for w in self._workers:
            w.close()
        if DistributedExecutor._active is self:
            DistributedExecutor._active = None

    @property
    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def _model(self) -> torch.nn.Module:
        if self.model is None:
            raise RuntimeError("the executor has no model loaded")
        return self.model


# --------------------------------------------------------------------------- helpers
def _exit_after(failure: WorkerFailure) -> None:
    time.sleep(EXIT_GRACE_S)
    print(f"mixtral: {failure}; exiting", file=sys.stderr, flush=True)
    os._exit(1)


def _shutdown_at_exit(ref: weakref.ReferenceType[DistributedExecutor]) -> None:
    ex = ref()
    if ex is not None:
        ex.shutdown()
