"""ParallelConfig: validation with messages that name the value, and layouts that cover the model exactly once
(query heads, KV heads with their GQA groups, experts x FFN slices)."""

from __future__ import annotations

import pytest

from mixtral.distributed.config import ParallelConfig
from mixtral.distributed.errors import ParallelConfigError
from mixtral.model.presets import PRESETS


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"tensor_parallel_size": 0}, "tensor_parallel_size must be a positive integer, got 0"),
    ({"tensor_parallel_size": True}, "tensor_parallel_size must be a positive integer, got True"),
    ({"tensor_parallel_size": 4, "expert_parallel_size": 3}, "expert_parallel_size 3 must divide"),
    ({"tensor_parallel_size": 2, "expert_parallel_size": 0}, "expert_parallel_size must be a positive integer"),
    ({"tensor_parallel_size": 2, "collective_timeout_s": 0}, "collective_timeout_s must be > 0"),
])
def test_bad_values_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ParallelConfigError, match=message):
        ParallelConfig(**kwargs)


def test_layout_names_and_sizes() -> None:
    assert ParallelConfig().describe() == "TP 1" and not ParallelConfig().is_distributed
    tp = ParallelConfig(4)
    assert (tp.describe(), tp.ep_size, tp.moe_tp_size) == ("TP 4", 1, 4)
    ep = ParallelConfig(4, enable_expert_parallel=True)  # vLLM: EP spans the TP ranks
    assert (ep.describe(), ep.ep_size, ep.moe_tp_size) == ("EP 4 (attention TP 4)", 4, 1)
    both = ParallelConfig(4, expert_parallel_size=2)  # implies EP
    assert both.enable_expert_parallel
    assert (both.describe(), both.ep_size, both.moe_tp_size) == ("TP 2 x EP 2 (attention TP 4)", 2, 2)


def test_docstring_example_8x7b_tp2_ep2_rank3() -> None:
    layout = ParallelConfig(4, expert_parallel_size=2).layout(PRESETS["mixtral-8x7b"], 3)
    assert (layout.heads, layout.kv_heads, layout.experts, layout.ffn) == ((24, 32), (6, 8), (4, 8), (7168, 14336))
    args = layout.shard_args(PRESETS["mixtral-8x7b"])
    assert (args.n_heads, args.n_kv_heads, args.hidden_dim, args.num_experts) == (8, 2, 7168, 8)


@pytest.mark.parametrize("model", ["mixtral-8x7b", "mixtral-8x22b", "tiny", "tiny-odd"])
@pytest.mark.parametrize("config", [ParallelConfig(2), ParallelConfig(4), ParallelConfig(8), ParallelConfig(16),
                                    ParallelConfig(2, True), ParallelConfig(8, True), ParallelConfig(4, True, 2),
                                    ParallelConfig(8, True, 4), ParallelConfig(3)], ids=lambda c: c.describe())
def test_layouts_cover_the_model_exactly(model: str, config: ParallelConfig) -> None:
    args = PRESETS[model]
    try:
        config.check_model(args)
    except ParallelConfigError as exc:  # the refusals must be exactly the shapes that do not split
        n = config.world_size
        splits = (args.n_heads % n == 0 and (args.n_kv_heads % n == 0 if n <= args.n_kv_heads
                                              else n % args.n_kv_heads == 0)
                  and args.num_experts % config.ep_size == 0 and args.hidden_dim % config.moe_tp_size == 0)
        assert not splits, exc
        assert str(n) in str(exc)
        return
    layouts = [config.layout(args, r) for r in range(config.world_size)]
    heads = sorted(h for lay in layouts for h in range(*lay.heads))
    assert heads == list(range(args.n_heads))
    group = args.n_heads // args.n_kv_heads
    for lay in layouts:  # every query head's KV head is on the rank
        assert all(lay.kv_heads[0] <= h // group < lay.kv_heads[1] for h in range(*lay.heads))
    replicas = max(1, config.world_size // args.n_kv_heads)
    kv = sorted(h for lay in layouts for h in range(*lay.kv_heads))
    assert kv == sorted(list(range(args.n_kv_heads)) * replicas)
    cells = sorted((e, f) for lay in layouts for e in range(*lay.experts) for f in range(*lay.ffn))
    assert cells == [(e, f) for e in range(args.num_experts) for f in range(args.hidden_dim)]


def test_unsplittable_shapes_name_the_shape() -> None:
    with pytest.raises(ParallelConfigError, match=r"n_heads \(6\) is not divisible by tensor_parallel_size 4"):
        ParallelConfig(4).check_model(PRESETS["tiny-odd"])
    with pytest.raises(ParallelConfigError, match=r"num_experts \(6\) is not divisible by the expert-parallel size 4"):
        ParallelConfig(4, True).check_model(PRESETS["tiny"].replace(num_experts=6))
    with pytest.raises(ParallelConfigError, match=r"exceeds n_kv_heads \(8\) and is not a multiple"):
        ParallelConfig(12).check_model(PRESETS["mixtral-8x7b"].replace(n_heads=48))
