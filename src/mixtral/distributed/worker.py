"""The worker loop: a rank other than 0 loads its shard, then follows the driver's messages until told to stop.

Each worker runs its own ``ModelRunner`` over its shard, with its own KV cache (its KV heads) and its own CUDA
graphs, captured with the all-reduces inside. It keeps no scheduler: every step arrives as a
``StepMessage`` (protocol.py) holding what changed since the driver last described each sequence (new tokens,
new blocks, a new block-table epoch after preemption, finished ids), which it applies to shadow ``Sequence``
objects and feeds to ``ModelRunner.launch`` with no sample rows: the driver samples, once, on rank 0.

Started two ways: by the driver on its own host (``python -m mixtral.distributed.worker --rank R ...``, with a
pipe to report an error and the driver's pid to watch), or as a ``torchrun`` rank through
:func:`run_torchrun_worker` (cli/parallel_args.py sends ranks > 0 there). Either way the loop exits when the
driver says STOP, when the driver's connection closes, or (spawned) when the driver process disappears.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
import traceback

import torch
import torch.distributed as dist

from mixtral.distributed.config import ParallelConfig
from mixtral.distributed.groups import DistributedInit, ProcessGroups, init_process_groups
from mixtral.distributed.protocol import Command, ControlChannel, StepMessage, read_json
from mixtral.distributed.reduce import install_all_reduce, time_all_reduce
from mixtral.distributed.status import exchange_status

logger = logging.getLogger("mixtral.distributed")

# How often a spawned worker checks that the driver process still exists.
_PARENT_POLL_S = 0.5


class Worker:
    """One rank's state between messages: its model, its runner and the shadows of the running sequences."""

    def __init__(self, groups: ProcessGroups) -> None:
        self.groups = groups
        self.channel = ControlChannel(groups.control)
        self.model: torch.nn.Module | None = None
        self.runner: object | None = None
        self.shadows: dict[int, object] = {}

    def run(self) -> None:
        """Serve messages until STOP, or a status exchange in which some rank failed."""
        while True:
            msg = self.channel.recv()
            cmd = Command(int(msg[0]))
            if cmd == Command.STOP:
                return
            if cmd in (Command.STEP, Command.STEP_EAGER):
                self.step(msg)
            elif cmd == Command.FORWARD:
                self.forward(msg)
            elif cmd == Command.BENCH_ALL_REDUCE:
                self.bench_all_reduce(msg)
            elif not self.with_status(cmd, msg):
                return

    # ----------------------------------------------------------------- commands answered with a status
    def with_status(self, cmd: Command, msg: torch.Tensor) -> bool:
        """Run a setup command, then tell every rank how it went; False when any rank failed (all stop)."""
        error, value = None, 0
        try:
            value = self.setup(cmd, msg)
        except Exception as exc:  # reported to the driver, which raises it naming this rank
            error = f"{type(exc).__name__}: {exc}"
            logger.error("rank %d: %s failed:\n%s", self.groups.rank, cmd.name, traceback.format_exc())
        statuses = exchange_status(self.groups.control, error, value)
        return all(s.error is None for s in statuses)

    def setup(self, cmd: Command, msg: torch.Tensor) -> int:
        if cmd == Command.LOAD:
            self.load(read_json(msg))
            return 0
        if cmd == Command.INIT_RUNNER:
            self.init_runner(read_json(msg))
            return 0
        runner = self._runner()
        if cmd == Command.PROFILE:
            return runner.profile_activation_bytes()
        if cmd == Command.PLAN_BLOCKS:
            return runner.plan_num_blocks()
        if cmd == Command.ALLOCATE:
            runner.allocate_kv_cache(int(msg[1]))
            return 0
        raise ValueError(f"unknown command {cmd!r}")

    def load(self, payload: dict) -> None:
        from mixtral.checkpoint.loader import parse_dtype, resolve
        from mixtral.distributed.sharded_loader import load_shard

        if payload["device_type"] != self.groups.device.type:
            raise RuntimeError(f"rank 0 computes on {payload['device_type']} but this rank on "
                               f"{self.groups.device.type}; every rank must use the same kind of device")
        if payload.get("threads"):
            torch.set_num_threads(int(payload["threads"]))
        parallel = ParallelConfig(**payload["parallel"])
        source = resolve(payload["model"])
        from mixtral.kernels.config import KernelConfig

        kernels = KernelConfig(**payload["kernels"]) if payload.get("kernels") else None
        shard = load_shard(source, parallel, self.groups.rank, self.groups.device, parse_dtype(payload["dtype"]),
                           seed=int(payload["seed"]), allow_pickle=bool(payload["allow_pickle"]), progress=False,
                           quantization=payload.get("quantization"), kernels=kernels)
        install_all_reduce(shard.model, self.groups.model)
        self.model = shard.model

    def init_runner(self, payload: dict) -> None:
        from mixtral.engine.config import EngineConfig
        from mixtral.engine.model_runner import ModelRunner
        from mixtral.engine.sampler import Sampler
        from mixtral.kernels.config import KernelConfig

        model = self._model()
        payload = {**payload, "kernels": KernelConfig(**payload["kernels"])}
        config = EngineConfig(**payload, device=model.device, dtype=model.dtype)
        # The sampler is never used here (rank 0 samples); ModelRunner wants one.
        self.runner = ModelRunner(model, config, Sampler(model.args.vocab_size, model.args.eos_id))
        self.shadows = {}

    # ----------------------------------------------------------------- the hot path
    @torch.inference_mode()
    def step(self, msg: torch.Tensor) -> None:
        from mixtral.engine.model_runner import StepPlan
        from mixtral.engine.scheduler import ScheduledSequence

        runner = self._runner()
        m = StepMessage.decode(msg)
        for seq_id in m.released:
            self.shadows.pop(seq_id, None)
            runner.release(seq_id)
        scheduled = []
        at = 0
        for i, (seq_id, epoch, start, n, new_blocks) in enumerate(m.seqs):
            seq = self.shadows.get(seq_id)
            if seq is None:
                seq = self.shadows[seq_id] = _shadow(seq_id)
            if seq.block_table_epoch != epoch:  # preempted and rescheduled: a new table
                seq.block_table = []
                seq.block_table_epoch = epoch
            seq.block_table.extend(m.blocks[at:at + new_blocks])
            at += new_blocks
            if m.token_ids:
                tokens = seq.token_ids
                if len(tokens) < start + n:
                    tokens.extend([0] * (start + n - len(tokens)))
                tokens[start:start + n] = m.token_ids[i].tolist()
            seq.num_computed_tokens = start
            scheduled.append(ScheduledSequence(seq, n))
        input_ids = None
        if m.device_ids:
            input_ids = torch.empty(m.device_ids, dtype=torch.int64, device=self.groups.device)
            dist.broadcast(input_ids, src=0, group=self.groups.model)
        # An eager step (rank 0 captures routing in it) runs eagerly here too; this rank keeps no routing.
        plan = StepPlan(scheduled, [], [], [None] * len(scheduled), [None] * len(scheduled) if m.eager else None)
        runner.launch(plan, None, input_ids=input_ids, input_rows=m.input_rows)

    @torch.inference_mode()
    def forward(self, msg: torch.Tensor) -> None:
        b, t = int(msg[1]), int(msg[2])
        ids = msg[3:3 + b * t].view(b, t).to(self.groups.device)
        self._model()(ids)

    def bench_all_reduce(self, msg: torch.Tensor) -> None:
        iters, n = int(msg[1]), int(msg[2])
        sizes = msg[3:3 + n].tolist()
        model = self._model()
        time_all_reduce(self.groups.model, sizes, model.args.dim, model.dtype, self.groups.device, iters)

    def _model(self) -> torch.nn.Module:
        if self.model is None:
            raise RuntimeError("no model loaded on this rank yet")
        return self.model

    def _runner(self):
        if self.runner is None:
            raise RuntimeError("no ModelRunner on this rank yet (the driver sends INIT_RUNNER first)")
        return self.runner


def _shadow(seq_id: int):
    """A sequence as a worker knows it: its id, block table and the tokens sent so far (others are 0)."""
    from mixtral.engine.sequence import Sequence
    from mixtral.sampling import SamplingParams

    return Sequence(request_id="", index=0, token_ids=[], num_prompt_tokens=0, params=SamplingParams(),
                    arrival_time=0.0, seq_id=seq_id)


# --------------------------------------------------------------------------- entry points
def serve(init: DistributedInit, device_type: str, timeout_s: float) -> None:
    """Join the group as a worker and run the loop until the driver stops it."""
    groups = init_process_groups(init, device_type, timeout_s)
    try:
        Worker(groups).run()
    finally:
        groups.destroy()


def run_torchrun_worker(init: DistributedInit, parallel: ParallelConfig) -> None:
    """A torchrun rank > 0: serve rank 0, then exit the process (status 0 after a clean STOP)."""
    if init.world_size != parallel.world_size:
        raise SystemExit(f"torchrun started {init.world_size} ranks but --tensor-parallel-size is "
                         f"{parallel.world_size}; they must match")
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    logging.basicConfig(level=logging.INFO)
    try:
        serve(init, device_type, parallel.collective_timeout_s)
    except Exception as exc:
        print(f"mixtral worker rank {init.rank}: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise SystemExit(1) from exc
    raise SystemExit(0)


def _watch_parent(parent_pid: int, rank: int) -> None:
    """Exit when the driver process is gone (reparented): never an orphan worker."""
    while True:
        time.sleep(_PARENT_POLL_S)
        if os.getppid() != parent_pid:
            print(f"mixtral worker rank {rank}: the driver (pid {parent_pid}) is gone; exiting", file=sys.stderr)
            os._exit(1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mixtral.distributed.worker",
                                description="A tensor-parallel worker the driver starts on its own host.")
    p.add_argument("--rank", type=int, required=True, help="this worker's rank (1 .. world size - 1)")
    p.add_argument("--world-size", type=int, required=True, help="number of ranks, the driver included")
    p.add_argument("--master-addr", default="127.0.0.1", help="address of the driver's rendezvous store")
    p.add_argument("--master-port", type=int, required=True, help="port of the driver's rendezvous store")
    p.add_argument("--device-type", choices=("cpu", "cuda"), required=True, help="compute on CPU or on cuda:RANK")
    p.add_argument("--timeout", type=float, required=True, help="collective timeout in seconds")
    p.add_argument("--parent-pid", type=int, required=True, help="the driver's pid: exit when it is gone")
    p.add_argument("--error-fd", type=int, default=-1, help="pipe to write a failure's message to before exiting")
    args = p.parse_args(argv)
    # Ctrl-C in a terminal reaches the whole process group: the driver decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(args.parent_pid, args.rank), daemon=True,
                     name="mixtral-parent-watch").start()
    init = DistributedInit(args.rank, args.world_size, args.rank, args.master_addr, args.master_port, "spawn")
    try:
        serve(init, args.device_type, args.timeout)
    except BaseException as exc:
        message = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
        if args.error_fd >= 0:
            with contextlib.suppress(OSError):
                os.write(args.error_fd, message.encode()[:4000])
        return 1
    return 0


if __name__ == "__main__":
    code = main()
    # Nothing is left to clean up (the groups are destroyed): skip the interpreter's teardown of torch, which
    # takes seconds on a busy host while the driver waits for this process to go.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
