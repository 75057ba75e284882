"""EngineConfig validation and KV cache sizing on CPU."""

from __future__ import annotations

import pytest
import torch

from mixtral.engine.config import EngineConfig
from mixtral.engine.memory import InsufficientMemoryError, block_bytes, plan_num_blocks
from mixtral.model.presets import preset

CPU = torch.device("cpu")


def test_block_bytes_counts_k_and_v_of_every_layer() -> None:
    args = preset("tiny")  # 2 layers, 2 KV heads of 16
    assert block_bytes(args, 16, torch.float32) == 16 * 2 * 2 * (2 * 16) * 4
    assert block_bytes(args, 16, torch.bfloat16) == block_bytes(args, 16, torch.float32) // 2


def test_byte_budget_explicit_blocks_and_default() -> None:
    args = preset("tiny")
    per_block = block_bytes(args, 16, torch.float32)
    cfg = EngineConfig(max_model_len=256, kv_cache_bytes=100 * per_block + 5).resolve(args.max_seq_len)
    assert plan_num_blocks(cfg, args, torch.float32, CPU) == 100
    cfg = EngineConfig(max_model_len=256, num_kv_blocks=7).resolve(args.max_seq_len)
    assert plan_num_blocks(cfg, args, torch.float32, CPU) == 7
    # Default on CPU: enough for every sequence at full length when that is under the default budget.
    cfg = EngineConfig(max_model_len=256, max_num_seqs=4).resolve(args.max_seq_len)
    assert plan_num_blocks(cfg, args, torch.float32, CPU) == 4 * 256 // 16


def test_a_budget_below_one_full_sequence_is_refused() -> None:
    args = preset("tiny")
    cfg = EngineConfig(max_model_len=1024, kv_cache_bytes=block_bytes(args, 16, torch.float32) * 10)
    with pytest.raises(InsufficientMemoryError, match=r"holds 10 blocks .* max_model_len=1024 needs 64"):
        plan_num_blocks(cfg.resolve(args.max_seq_len), args, torch.float32, CPU)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"block_size": 12}, "power of two"),
    ({"block_size": 0}, "block_size must be a positive integer"),
    ({"max_num_seqs": 0}, "max_num_seqs"),
    ({"max_num_batched_tokens": -5}, "max_num_batched_tokens"),
    ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
    ({"kv_cache_bytes": 0}, "kv_cache_bytes"),
])
def test_config_rejects_bad_values(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        EngineConfig(**kwargs)


def test_max_model_len_cannot_exceed_the_model() -> None:
    with pytest.raises(ValueError, match="max_model_len=4096 exceeds the model's context length 2048"):
        EngineConfig(max_model_len=4096).resolve(2048)
    assert EngineConfig().resolve(2048).max_model_len == 2048


def test_the_engine_takes_its_runners_plan() -> None:
    """The engine sizes the cache by asking its runner: a parallel runner answers with the smallest of its ranks'
    plans (distributed/runner.py), so a rank with less free memory is never over-committed."""
    from engine_testing import build_tiny_model

    from mixtral.engine.llm_engine import LLMEngine
    from mixtral.engine.model_runner import ModelRunner

    class SmallestRank(ModelRunner):
        def plan_num_blocks(self) -> int:
            return min(super().plan_num_blocks(), 23)  # as if another rank had room for 23 blocks only

    cfg = EngineConfig(max_model_len=256, num_kv_blocks=40)
    alone = LLMEngine(build_tiny_model(), cfg)
    assert alone.model_runner.num_blocks == alone.block_manager.num_blocks == 40
    engine = LLMEngine(build_tiny_model(), cfg, runner_factory=SmallestRank)
    assert engine.model_runner.num_blocks == engine.block_manager.num_blocks == 23
