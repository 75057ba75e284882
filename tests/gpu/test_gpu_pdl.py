"""Programmatic dependent launch (PDL) on and off: the choice reaches the launches, and it changes scheduling
only, never a result. Every Triton kernel family the engine launches runs back to back on one stream, as in a
decode or prefill step, once with PDL and once without: the outputs must be the same bits. (The engine with PDL
off against the reference path is in test_gpu_engine.py.)
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from gpu_testing import capture, paged_batch, randn

from mixtral.kernels.reference import route_topk

pytestmark = pytest.mark.gpu

D, F = 4096, 14336


def test_the_choice_reaches_the_launch(cuda: torch.device, kernels: SimpleNamespace, kernel_choice) -> None:
    pdl = kernels.pdl
    x = torch.empty(1, device=cuda)
    hopper = torch.cuda.get_device_capability(cuda)[0] >= 9
    with kernel_choice(pdl=True):
        assert pdl.pdl_on(x) == (hopper and pdl.HAS_GDC)
        assert pdl.pdl_args(x)["PDL"] == (hopper and pdl.HAS_GDC)
    with kernel_choice(pdl=False):
        assert not pdl.pdl_on(x) and pdl.pdl_args(x) == {"PDL": False}


def inputs(cuda: torch.device) -> dict[str, torch.Tensor]:
    """The same random inputs every call: 8 decode rows at 8x7B shapes, two prompts, a 2048-token MoE input."""
    gen = torch.Generator(device=cuda).manual_seed(11)
    dt = torch.bfloat16
    t: dict[str, torch.Tensor] = {
        "x": randn(gen, 8, D, dtype=dt),
        "w_norm": (torch.rand(D, device=cuda, generator=gen) + 0.5).to(dt),
        "wqkv": randn(gen, 6144, D, dtype=dt, scale=D**-0.5),
        "gate": randn(gen, 8, D, dtype=dt, scale=D**-0.5),
        "w13": randn(gen, 8, 2 * F, D, dtype=dt, scale=D**-0.5),
        "w2": randn(gen, 8, D, F, dtype=dt, scale=F**-0.5),
        "cos": randn(gen, 8, 128, dtype=dt),
        "sin": randn(gen, 8, 128, dtype=dt),
        "slots": torch.arange(8, device=cuda) * 3,
        "xp": randn(gen, 2048, D, dtype=dt),
    }
    t["wp"], t["idp"] = route_topk(randn(gen, 2048, 8), 2)
    names = ("q", "kc", "vc", "bt", "cl", "qsl")
    t |= dict(zip(names, paged_batch(gen, [1] * 8, [700] * 8, 32, 8, 128, 16, dt), strict=True))
    t |= dict(zip(["p" + n for n in names], paged_batch(gen, [512, 100], [600, 100], 32, 8, 128, 16, dt),
                  strict=True))
    return t


def chain(k: SimpleNamespace, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Every kernel family once, in a dependent chain where each kernel reads what the one before wrote:
    norm, skinny GEMM, RoPE + K/V store, paged decode, residual add + norm, fused router, routing, decode MoE,
    K/V store, paged prefill, prefill MoE. The caches are written in place (the same values on every run)."""
    h = k.rmsnorm.rms_norm(t["x"], t["w_norm"], 1e-5)  # [8, D]
    qkv = k.skinny_gemm.skinny_gemm(h, t["wqkv"])  # [8, 6144]
    qq, kk, vv = qkv.split([4096, 1024, 1024], dim=-1)
    qr, kr = k.rope.rope_qk(qq.reshape(8, 32, 128), kk.reshape(8, 8, 128), t["cos"], t["sin"],
                            cache=(vv.reshape(8, 8, 128), t["kc"], t["vc"], t["slots"]))
    attn = k.paged_attention.paged_attention(t["q"] + qr, t["kc"], t["vc"], t["bt"], t["cl"], t["qsl"],
                                             max_query_len=1, max_context_len=2048)  # [8, 32, 128]
    normed, summed = k.rmsnorm.add_rms_norm(attn.reshape(8, D), t["x"], t["w_norm"], 1e-5)
    logits, weights, ids = k.gate_router.gate_route_fused(normed, t["gate"], 2)
    w_alt, ids_alt = k.router.route_topk_fused(logits, 2)
    moe = k.fused_moe.fused_moe(normed, t["w13"], t["w2"], weights, ids)
    k.write_kv.write_kv(kr, kr, t["pkc"], t["pvc"], t["slots"])
    prefill = k.paged_attention.paged_attention(t["pq"], t["pkc"], t["pvc"], t["pbt"], t["pcl"], t["pqsl"],
                                                max_query_len=512, max_context_len=600)
    moe_prefill = k.sorted_moe.sorted_moe(t["xp"], t["w13"], t["w2"], t["wp"], t["idp"])
    return (h, qkv, qr, kr, t["kc"], t["vc"], attn, normed, summed, logits, weights, ids, w_alt, ids_alt, moe,
            t["pkc"], prefill, moe_prefill)


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_pdl_on_and_off_give_the_same_bits(cuda: torch.device, kernels: SimpleNamespace, kernel_choice,
                                           graph: bool) -> None:
    outs = {}
    for on in (True, False):
        t = inputs(cuda)
        with kernel_choice(pdl=on):
            if graph:  # captured as one CUDA graph, where PDL lets each launch overlap the one before
                g, out = capture(lambda t=t: chain(kernels, t))
                g.replay()
                torch.cuda.synchronize()
            else:
                out = chain(kernels, t)
        outs[on] = [o.clone() for o in out]
        del t, out
    for i, (a, b) in enumerate(zip(outs[True], outs[False], strict=True)):
        assert torch.equal(a, b), f"output {i} differs between PDL on and off"
