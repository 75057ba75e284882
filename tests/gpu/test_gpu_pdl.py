"""Programmatic dependent launch (PDL) on and off: ``KernelConfig(pdl=...)`` reaches every launch the dispatch
makes, and it changes scheduling only, never a result. Every Triton kernel family the engine launches runs back
to back on one stream, as in a decode or prefill step, once with ``pdl=True`` and once with ``pdl=False``: the
outputs must be the same bits. (The engine with PDL off against the reference path is in test_gpu_engine.py.)
"""

from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from gpu_testing import capture, paged_batch, randn

from mixtral.kernels.config import KernelConfig
from mixtral.kernels.dispatch import Kernels
from mixtral.kernels.reference import route_topk

pytestmark = pytest.mark.gpu

D, F = 4096, 14336


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


def chain(k: SimpleNamespace, t: dict[str, torch.Tensor], pdl: bool) -> tuple[torch.Tensor, ...]:
    """Every kernel family once, in a dependent chain where each kernel reads what the one before wrote:
    norm, skinny GEMM, RoPE + K/V store, paged decode, residual add + norm, fused router, routing, decode MoE,
    K/V store, paged prefill, prefill MoE; each launched with ``pdl``. The caches are written in place (the
    same values on every run)."""
    h = k.rmsnorm.rms_norm(t["x"], t["w_norm"], 1e-5, pdl)  # [8, D]
    qkv = k.skinny_gemm.skinny_gemm(h, t["wqkv"], pdl=pdl)  # [8, 6144]
    qq, kk, vv = qkv.split([4096, 1024, 1024], dim=-1)
    qr, kr = k.rope.rope_qk(qq.reshape(8, 32, 128), kk.reshape(8, 8, 128), t["cos"], t["sin"],
                            cache=(vv.reshape(8, 8, 128), t["kc"], t["vc"], t["slots"]), pdl=pdl)
    attn = k.paged_attention.paged_attention(t["q"] + qr, t["kc"], t["vc"], t["bt"], t["cl"], t["qsl"],
                                             max_query_len=1, max_context_len=2048, pdl=pdl)  # [8, 32, 128]
    normed, summed = k.rmsnorm.add_rms_norm(attn.reshape(8, D), t["x"], t["w_norm"], 1e-5, pdl)
    logits, weights, ids = k.gate_router.gate_route_fused(normed, t["gate"], 2, pdl=pdl)
    w_alt, ids_alt = k.router.route_topk_fused(logits, 2, pdl)
    moe = k.fused_moe.fused_moe(normed, t["w13"], t["w2"], weights, ids, pdl=pdl)
    k.write_kv.write_kv(kr, kr, t["pkc"], t["pvc"], t["slots"], pdl)
    prefill = k.paged_attention.paged_attention(t["pq"], t["pkc"], t["pvc"], t["pbt"], t["pcl"], t["pqsl"],
                                                max_query_len=512, max_context_len=600, pdl=pdl)
    moe_prefill = k.sorted_moe.sorted_moe(t["xp"], t["w13"], t["w2"], t["wp"], t["idp"], pdl=pdl)
    return (h, qkv, qr, kr, t["kc"], t["vc"], attn, normed, summed, logits, weights, ids, w_alt, ids_alt, moe,
            t["pkc"], prefill, moe_prefill)


def dispatch_chain(dispatch: Kernels, t: dict[str, torch.Tensor]) -> None:
    """Every method of the dispatch that launches a Triton kernel, as a step calls them (decode rows, then a
    prompt and a prefill-sized MoE)."""
    with torch.inference_mode():
        h = dispatch.rms_norm(t["x"], t["w_norm"], 1e-5)
        qkv = dispatch.linear(h, t["wqkv"])  # [8, 6144]
        qq, kk, vv = qkv.split([4096, 1024, 1024], dim=-1)
        q, k, v = qq.reshape(8, 32, 128), kk.reshape(8, 8, 128), vv.reshape(8, 8, 128)
        dispatch.rope_qk(q, k, t["cos"], t["sin"])
        qr, kr = dispatch.rope_qk_store(q, k, v, t["cos"], t["sin"], t["kc"], t["vc"], t["slots"])
        attn = dispatch.paged_attention(t["q"] + qr, t["kc"], t["vc"], t["bt"], t["cl"], t["qsl"], max_query_len=1,
                                   max_context_len=2048)
        normed, _ = dispatch.add_rms_norm(attn.reshape(8, D), t["x"], t["w_norm"], 1e-5)
        counts = torch.zeros(8, dtype=torch.int64, device=normed.device)
        logits, weights, ids = dispatch.gate_route(normed, t["gate"], 2, counts)
        dispatch.route_topk(logits, 2)
        dispatch.moe_experts(normed, t["w13"], t["w2"], weights, ids)
        dispatch.write_kv(kr, kr, t["pkc"], t["pvc"], t["slots"])
        dispatch.paged_attention(t["pq"], t["pkc"], t["pvc"], t["pbt"], t["pcl"], t["pqsl"], max_query_len=512,
                            max_context_len=600)
        dispatch.moe_experts(t["xp"], t["w13"], t["w2"], t["wp"], t["idp"])


# Kernel modules every dispatch_chain launches from (a module asks pdl_args for each of its launches); the
# prefill MoE adds the sorted GEMMs' modules on sm90+.
DECODE_MODULES = {"rmsnorm", "skinny_gemm", "rope", "paged_decode", "paged_attention", "gate_router", "router",
                  "moe_align", "fused_moe", "moe_sum", "write_kv"}
PREFILL_MOE_MODULES = {"moe_align", "moe_glue", "sorted_moe"}


@pytest.mark.parametrize("on", [True, False], ids=["pdl_on", "pdl_off"])
def test_the_choice_reaches_every_launch(cuda: torch.device, kernels: SimpleNamespace,
                                         monkeypatch: pytest.MonkeyPatch, on: bool) -> None:
    """Through ``Kernels(KernelConfig(pdl=on))`` every Triton launch asks ``pdl_args`` with ``on``, and gets
    PDL exactly when on, on sm90+, with a Triton that has griddepcontrol."""
    pdl = kernels.pdl
    launches: list[tuple[str, bool, dict[str, bool]]] = []
    prefix = "mixtral.kernels.triton."
    for name, module in list(sys.modules.items()):
        if name.startswith(prefix) and module is not pdl and hasattr(module, "pdl_args"):
            def spy(t: torch.Tensor, enabled: bool = True, _name: str = name[len(prefix):]) -> dict[str, Any]:
                args = pdl.pdl_args(t, enabled)
                launches.append((_name, enabled, args))
                return args

            monkeypatch.setattr(module, "pdl_args", spy)
    dispatch_chain(Kernels(KernelConfig(pdl=on)), inputs(cuda))
    hopper = torch.cuda.get_device_capability(cuda)[0] >= 9
    want = {"PDL": True, "launch_pdl": True} if on and hopper and pdl.HAS_GDC else {"PDL": False}
    seen = {name for name, _, _ in launches}
    assert seen >= DECODE_MODULES | (PREFILL_MOE_MODULES if hopper else set()), sorted(seen)
    wrong = [(name, enabled, args) for name, enabled, args in launches if enabled is not on or args != want]
    assert not wrong, f"launches that missed pdl={on}: {wrong}"


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_pdl_on_and_off_give_the_same_bits(cuda: torch.device, kernels: SimpleNamespace, graph: bool) -> None:
    outs = {}
    for on in (True, False):
        t = inputs(cuda)
        if graph:  # captured as one CUDA graph, where PDL lets each launch overlap the one before
            g, out = capture(lambda t=t, on=on: chain(kernels, t, on))
            g.replay()
            torch.cuda.synchronize()
        else:
            out = chain(kernels, t, on)
        outs[on] = [o.clone() for o in out]
        del t, out
    for i, (a, b) in enumerate(zip(outs[True], outs[False], strict=True)):
        assert torch.equal(a, b), f"output {i} differs between PDL on and off"
