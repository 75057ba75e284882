"""Roofline arithmetic: the figures the GPU benchmark divides by."""

from __future__ import annotations

import pytest

from mixtral.bench import roofline
from mixtral.model.presets import preset


def test_expected_experts_hit_limits() -> None:
    assert roofline.expected_experts_hit(1, 8, 2) == pytest.approx(2.0)
    assert roofline.expected_experts_hit(8, 8, 2) == pytest.approx(8 * (1 - 0.75**8))
    assert roofline.expected_experts_hit(1000, 8, 2) == pytest.approx(8.0)


def test_batch1_decode_reads_active_parameters() -> None:
    args = preset("mixtral-8x7b")
    step = roofline.decode_step_bytes(args, batch=1, context_len=0)
    counts = args.num_parameters()
    # Batch 1 reads every active weight once, except the input embedding table (one row).
    expected = (counts["active"] - counts["embeddings"] // 2 + args.dim) * 2
    assert step.weights == pytest.approx(expected)
    assert counts["total"] == pytest.approx(46.7e9, rel=0.01)
    assert counts["active"] == pytest.approx(12.9e9, rel=0.01)


def test_kv_bytes_grow_with_batch_and_context() -> None:
    args = preset("mixtral-8x7b")
    a = roofline.decode_step_bytes(args, 8, 512)
    b = roofline.decode_step_bytes(args, 16, 512)
    assert b.kv == pytest.approx(2 * a.kv)
    assert a.kv == 8 * 512 * 2 * 32 * 8 * 128 * 2


def test_prefill_flops_dominated_by_active_matmuls() -> None:
    args = preset("mixtral-8x7b")
    f = roofline.prefill_flops(args, 2048)
    active_matmul = 2 * 2048 * (args.num_parameters()["active"] - args.num_parameters()["embeddings"])
    assert active_matmul < f < 1.2 * active_matmul


# --------------------------------------------------------------------------- quantized weights, FP8 KV
def _parts(model: str, scheme: str | None) -> tuple[dict[str, int], dict]:
    import torch

    from mixtral.checkpoint.loader import resolve
    from mixtral.checkpoint.quant_load import planned_methods, quant_spec_for
    from mixtral.model.footprint import weight_bytes

    source = resolve(model)
    methods = planned_methods(source, quant_spec_for(source, scheme))
    return weight_bytes(source.args, torch.bfloat16, methods), methods


@pytest.mark.parametrize("scheme", [None, "fp8", "int8", "int4"])
@pytest.mark.parametrize("batch", [1, 8, 64])
def test_step_bytes_are_the_footprint_a_load_allocates(scheme: str | None, batch: int) -> None:
    """A step reads every attention, router and norm byte and the lm_head as loaded, the hit experts' share of
    the expert bytes (codes and scales), and B rows of the bf16 input embeddings."""
    args = preset("mixtral-8x7b")
    parts, _ = _parts("mixtral-8x7b", scheme)
    fmt = roofline.WeightFormat.from_footprint(args, parts, 2)
    hit = roofline.expected_experts_hit(batch, args.num_experts, args.num_experts_per_tok)
    want = (parts["attention"] + parts["router_norms"] + parts["lm_head"]
            + parts["experts"] * hit / args.num_experts + batch * args.dim * 2)
    assert roofline.decode_step_bytes(args, batch, 0, fmt=fmt).weights == pytest.approx(want, rel=1e-12)


def test_bytes_per_parameter_of_each_scheme() -> None:
    """fp8: one byte plus an fp32 scale per output channel; int8: plus an fp16 scale; int4: half a byte plus an
    fp16 scale per group of 128 inputs. The experts' bytes are the methods' own ``weight_bytes``."""
    args = preset("mixtral-8x7b")
    d, f, e = args.dim, args.hidden_dim, args.num_experts
    for scheme, attention, experts in (("fp8", 1 + 4 / d, 1 + 4 * (2 / d + 1 / f) / 3),
                                       ("int8", 1 + 2 / d, 1 + 2 * (2 / d + 1 / f) / 3),
                                       ("int4", 0.5 + 2 / 128, 0.5 + 2 / 128)):
        parts, methods = _parts("mixtral-8x7b", scheme)
        fmt = roofline.WeightFormat.from_footprint(args, parts, 2)
        assert fmt.attention == pytest.approx(attention, rel=0.02), scheme
        assert fmt.experts == pytest.approx(experts, rel=1e-9), scheme
        assert fmt.dense == 2
        w13 = next(m for name, m in methods.items() if name.endswith("feed_forward.w13"))
        w2 = next(m for name, m in methods.items() if name.endswith("feed_forward.w2"))
        per_layer = w13.weight_bytes((e,), 2 * f, d) + w2.weight_bytes((e,), d, f)
        assert parts["experts"] == args.n_layers * per_layer


def test_fp8_and_int4_steps_against_bf16() -> None:
    """Batch 1 of 8x7B: FP8 reads just over half of bf16's bytes, int4 just over a quarter (the bf16
    lm_head and embedding rows stay); an FP8 KV cache halves the KV bytes."""
    args = preset("mixtral-8x7b")
    bf16 = roofline.decode_step_bytes(args, 1, 512)
    steps = {s: roofline.decode_step_bytes(args, 1, 512, fmt=roofline.WeightFormat.from_footprint(
        args, _parts("mixtral-8x7b", s)[0], 2)) for s in ("fp8", "int4")}
    assert 0.50 < steps["fp8"].weights / bf16.weights < 0.52
    assert 0.26 < steps["int4"].weights / bf16.weights < 0.28
    assert steps["fp8"].kv == bf16.kv
    assert roofline.decode_step_bytes(args, 1, 512, kv_dtype_bytes=1).kv == bf16.kv / 2
    assert roofline.decode_roofline_tok_s(args, 1, 512, 3e12, fmt=roofline.WeightFormat.plain(2)) == pytest.approx(
        3e12 / bf16.total)


def test_datasheet_peaks_by_precision() -> None:
    assert roofline.datasheet_peak("NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
    assert roofline.datasheet_peak("NVIDIA H200", "fp8") == pytest.approx(2 * 989.4e12, rel=1e-3)
    assert roofline.datasheet_peak("NVIDIA A100-SXM4-80GB", "fp8") is None  # no FP8 tensor cores
    assert roofline.datasheet_peak("Some GPU") is None


def test_rank_bytes_take_the_weight_format() -> None:
    """Per GPU under TP 2: the default format is bf16 everywhere; FP8 weights halve the sharded parts, and the
    one-process figure is what a group of one reads."""
    from mixtral.bench.parallel import rank_decode_bytes
    from mixtral.distributed.config import ParallelConfig

    args = preset("mixtral-8x7b")
    fp8 = roofline.WeightFormat.from_footprint(args, _parts("mixtral-8x7b", "fp8")[0], 2)
    plain = rank_decode_bytes(args, ParallelConfig(2), 8, 512)
    assert rank_decode_bytes(args, ParallelConfig(2), 8, 512, fmt=roofline.WeightFormat.plain(2)) == plain
    tp2 = rank_decode_bytes(args, ParallelConfig(2), 8, 512, fmt=fp8, kv_dtype_bytes=1)
    one = roofline.decode_step_bytes(args, 8, 512, fmt=fp8, kv_dtype_bytes=1)
    assert tp2.kv == pytest.approx(one.kv / 2)
    assert 0.49 < tp2.weights / one.weights < 0.53  # + the replicated bf16 lm_head
    assert rank_decode_bytes(args, ParallelConfig(1), 8, 512, fmt=fp8).weights == pytest.approx(
        roofline.decode_step_bytes(args, 8, 512, fmt=fp8).weights)
