"""DistributedModelRunner: what the engine steps in place of a ``ModelRunner`` when the model spans ranks.

Every call runs on every rank and answers with rank 0's result. Per step (``launch``) it sends the workers one
control message with what changed since the last step (protocol.py), broadcasts the previous step's sampled ids
from the device when the step was launched ahead of them, then runs rank 0's own ``ModelRunner.launch``, whose
forward pass pairs its all-reduces with the workers' and whose sampler runs on rank 0 only. Setup calls
(profiling, KV planning and allocation) run on every rank through the executor and end with a status exchange.
Only the methods below exist: an engine that needs another one fails loudly instead of running out of step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from mixtral.distributed.protocol import Command, StepMessage

if TYPE_CHECKING:
    from mixtral.distributed.executor import DistributedExecutor
    from mixtral.engine.model_runner import LaunchedStep, ModelRunner, StepPlan

# Sequences with at least this many new tokens send their ids as one tensor slice (a prompt chunk); decode
# steps' single tokens are gathered in a list.
_TENSOR_TOKENS = 64


class DistributedModelRunner:
    """ModelRunner's interface over a tensor-parallel group (built by ``DistributedExecutor.make_runner``)."""

    def __init__(self, executor: DistributedExecutor, local: ModelRunner) -> None:
        self.executor = executor
        self.local = local  # rank 0's own ModelRunner
        self._sent: dict[int, tuple[int, int]] = {}  # seq_id -> (block-table epoch, blocks the workers have)
        self._released: list[int] = []

    # Attributes of the local runner the engine and benchmarks read.
    @property
    def model(self) -> torch.nn.Module:
        return self.local.model

    @property
    def config(self) -> Any:
        return self.local.config

    @property
    def sampler(self) -> Any:
        return self.local.sampler

    @property
    def args(self) -> Any:
        return self.local.args

    @property
    def device(self) -> torch.device:
        return self.local.device

    @property
    def dtype(self) -> torch.dtype:
        return self.local.dtype

    @property
    def num_blocks(self) -> int:
        return self.local.num_blocks

    @property
    def healthy(self) -> bool:
        return self.executor.healthy

    # ----------------------------------------------------------------- setup
    def profile_activation_bytes(self) -> int:
        """Rank 0's activation peak (the warm-up forward runs on every rank: its all-reduces need them)."""
        return self.executor.setup_command(Command.PROFILE, 0, "profiling activation memory",
                                           self.local.profile_activation_bytes)[0]

    def plan_num_blocks(self) -> int:
        """KV blocks every rank can hold: each rank plans with its own free memory; the smallest wins."""
        values = self.executor.setup_command(Command.PLAN_BLOCKS, 0, "planning the KV cache",
                                             self.local.plan_num_blocks)
        return min(values)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """Allocate every rank's KV cache (its own KV heads) and capture its CUDA graphs, all at once."""
        self.executor.setup_command(Command.ALLOCATE, num_blocks, f"allocating {num_blocks} KV blocks",
                                    lambda: self.local.allocate_kv_cache(num_blocks) or 0)

    # ----------------------------------------------------------------- steps
    def launch(self, plan: StepPlan, bitmask_fn: Callable[[], torch.Tensor | None] | None = None,
               input_ids: torch.Tensor | None = None, input_rows: list[int] | None = None) -> LaunchedStep:
        """``ModelRunner.launch`` on every rank; the ``LaunchedStep`` of rank 0, which samples."""
        ex = self.executor
        msg = self._step_message(plan, input_ids, input_rows)
        forward_done = False

        def after_forward() -> torch.Tensor | None:
            # ModelRunner calls this once the forward pass (and with it the step's all-reduces) is issued.
            nonlocal forward_done
            forward_done = True
            return bitmask_fn() if bitmask_fn is not None else None

        ex.check()
        try:
            ex.channel.send(msg.encode())
            if input_ids is not None:
                dist.broadcast(input_ids, src=0, group=ex.groups.model)
            return self.local.launch(plan, after_forward, input_ids, input_rows)
        except Exception as exc:
            if forward_done and ex.healthy:
                raise  # after the forward pass (a guide, the sampler): the ranks are still in step
            raise ex.failed_from(exc, "running a step") from exc

    def _step_message(self, plan: StepPlan, input_ids: torch.Tensor | None, input_rows: list[int] | None
                      ) -> StepMessage:
        msg = StepMessage(released=self._released, eager=plan.routing is not None)
        self._released = []
        pending: list[int] = []  # single tokens (decode) gathered before they become one tensor
        for s in plan.scheduled:
            seq, start, n = s.seq, s.start, s.num_new_tokens
            epoch, table = seq.block_table_epoch, seq.block_table
            known = self._sent.get(seq.seq_id)
            have = known[1] if known is not None and known[0] == epoch else 0
            msg.seqs.append((seq.seq_id, epoch, start, n, len(table) - have))
            msg.blocks += table[have:]
            self._sent[seq.seq_id] = (epoch, len(table))
            if input_ids is None:
                if n < _TENSOR_TOKENS:
                    pending += seq.token_ids[start:start + n]
                else:
                    if pending:
                        msg.token_ids.append(torch.tensor(pending, dtype=torch.int64))
                        pending = []
                    msg.token_ids.append(seq.new_token_ids(start, n))
        if pending:
            msg.token_ids.append(torch.tensor(pending, dtype=torch.int64))
        if input_ids is not None:
            if input_ids.dtype != torch.int64 or not input_ids.is_contiguous():
                raise ValueError(f"input_ids must be a contiguous int64 tensor, got {input_ids.dtype}")
            msg.device_ids = input_ids.shape[0]
            msg.input_rows = list(input_rows) if input_rows is not None else None
        return msg

    def release(self, seq_id: int) -> None:
        """A sequence finished: forget it here, and on the workers with the next step."""
        self.local.release(seq_id)
        if self._sent.pop(seq_id, None) is not None:
            self._released.append(seq_id)

    def expert_counts(self) -> torch.Tensor:
        """Routing counts [L, E] (every rank routes the same tokens alike; rank 0's count all experts)."""
        return self.local.expert_counts()

    def shutdown(self) -> None:
        """The engine is done: stop the group if the engine owns it (``DistributedExecutor.stop_with_engine``)."""
        if self.executor.stop_with_engine:
            self.executor.shutdown()
