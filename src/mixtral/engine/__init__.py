"""The serving engine, in vLLM's vocabulary: sequences, block manager, scheduler, model runner, engines.

Map of the package (data flows top to bottom each step):
- ``llm_engine.LLMEngine``: add_request / step / abort; ``async_engine.AsyncEngine`` drives it for the server;
  its pieces: ``admission`` (validation, tokenization -> SequenceGroup), ``requests`` (the live-request table),
  ``step_plan`` (what a step samples; the step launched ahead; guide masks), ``step_apply`` (tokens -> outputs,
  per-request failures);
- ``scheduler.Scheduler``: continuous batching, chunked prefill, preemption by recompute;
- ``block_manager.BlockManager``: paged KV blocks, ref counts, prefix caching;
- ``model_runner.ModelRunner``: flat ragged inputs, slot mapping, the forward pass; ``attention`` holds its
  ``PagedAttentionContext``; ``sampler.Sampler`` samples on the device;
- ``output_processor``: detokenization and stop rules; ``sequence`` / ``outputs``: the bookkeeping types;
- ``config.EngineConfig`` and ``memory``: limits and KV cache sizing; ``loading``: model + tokenizer.

Names are imported lazily (``from mixtral.engine import LLMEngine``) so importing the package stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "LLMEngine": "mixtral.engine.llm_engine",
    "RequestTooLongError": "mixtral.engine.admission",
    "EngineStats": "mixtral.engine.llm_engine",
    "AsyncEngine": "mixtral.engine.async_engine",
    "EngineOverloadedError": "mixtral.engine.async_engine",
    "EngineDeadError": "mixtral.engine.async_engine",
    "EngineConfig": "mixtral.engine.config",
    "RequestOutput": "mixtral.engine.outputs",
    "CompletionOutput": "mixtral.engine.outputs",
    "RequestError": "mixtral.engine.outputs",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mixtral.engine' has no attribute {name!r}")
