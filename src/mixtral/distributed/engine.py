"""An ``LLMEngine`` over a tensor-parallel group: what ``LLMEngine.from_config`` does when the layout spans ranks.

The engine itself does not change: it schedules, samples (through rank 0's runner) and detokenizes as in one
process, and steps a ``DistributedModelRunner`` that ``DistributedExecutor.make_runner`` builds with
``ModelRunner``'s constructor signature. The engine takes that factory (``runner_factory=``) and stops the
group in ``shutdown`` (see docs/PARALLEL.md, "Wiring").
"""

from __future__ import annotations

from typing import Any

import torch

from mixtral.distributed.config import ParallelConfig
from mixtral.distributed.executor import DistributedExecutor

# The keyword arguments of LLM(...) / LLMEngine.from_config that describe the layout (vLLM's names).
PARALLEL_KWARGS = ("tensor_parallel_size", "enable_expert_parallel", "expert_parallel_size",
                   "collective_timeout_s", "exit_on_worker_failure")


def pop_parallel_config(kwargs: dict[str, Any]) -> ParallelConfig:
    """Take the layout out of ``kwargs`` (``parallel_config=`` or vLLM's ``tensor_parallel_size=`` and
    ``enable_expert_parallel=``); what is left is EngineConfig's."""
    given = kwargs.pop("parallel_config", None)
    fields = {k: kwargs.pop(k) for k in PARALLEL_KWARGS if k in kwargs}
    if given is not None:
        if fields:
            raise ValueError(f"pass either parallel_config or {sorted(fields)}, not both")
        if not isinstance(given, ParallelConfig):
            raise TypeError(f"parallel_config must be a ParallelConfig, got {type(given).__name__}")
        return given
    return ParallelConfig(**fields)


def engine_over(executor: DistributedExecutor, engine_cls: type, tokenizer: Any = None, model_name: str = "model",
                **engine_kwargs: Any) -> Any:
    """An ``engine_cls`` (LLMEngine) stepping ``executor``'s group with ``EngineConfig(**engine_kwargs)``.

    The executor may serve several engines one after another (each call rebuilds every rank's runner and KV
    cache); only the latest may be stepped."""
    from mixtral.engine.config import EngineConfig
    from mixtral.tokenizer import Tokenizer

    config = EngineConfig(device=executor.device, dtype=executor.dtype, **engine_kwargs)
    tok = tokenizer or Tokenizer.for_model(executor.source)
    return engine_cls(executor.model, config, tok, model_name, runner_factory=executor.make_runner)


def build_parallel_engine(engine_cls: type, model: Any, parallel: ParallelConfig, *,
                          device: torch.device | str | None = None, dtype: torch.dtype | str | None = None,
                          tokenizer: Any = None, quantization: str | None = None, **engine_kwargs: Any) -> Any:
    """Start the group for ``model`` (a folder, preset, "demo", Hub repo id or None = the default model) and
    build ``engine_cls`` over it. A built ``Transformer`` cannot be spread: every rank loads its own slices."""
    from mixtral.defaults import DEFAULT_MODEL
    from mixtral.model.mixtral import Transformer

    if isinstance(model, Transformer):
        raise ValueError("tensor parallelism loads the model on every rank from its files: pass a model folder, "
                         "preset or repo id, not a built Transformer (a LoRA adapter merged at load included: "
                         "save the merged model as a checkpoint and serve that)")
    name = str(model) if model is not None else DEFAULT_MODEL
    executor = DistributedExecutor.start(name, parallel, device, dtype, seed=engine_kwargs.get("seed", 0),
                                         quantization=quantization, kernels=engine_kwargs.get("kernels"))
    executor.stop_with_engine = True
    try:
        return engine_over(executor, engine_cls, tokenizer, name, **engine_kwargs)
    except BaseException:
        executor.shutdown()
        raise
