"""The small fused Triton kernels on a GPU against their references in kernels/reference.py, at Mixtral-8x7B
shapes (D 4096; 32 query / 8 KV heads of 128 as strided views of a fused qkv row; 8 experts, top-2), bf16 /
fp16 / fp32, N = 1..512 tokens:

- RMSNorm and residual add + RMSNorm within two rounding steps of the dtype, the residual sum exact;
- RoPE on q/k bit-identical; RoPE fused with the K/V store equal to RoPE then ``write_kv``;
- top-k routing: ids equal (either id where the reference's probabilities tie exactly), weights within 1e-5;
- the fused router (gate GEMV + routing + expert counts) at D 4096 and 6144, with and without a padding mask;
- the weight-streaming GEMM (decode-sized rows) within one rounding of an fp32 product;
- the default ``KernelConfig``'s dispatch (``Kernels``) running each kernel under inference mode; the fused
  router's choice off (``fused_gate=False``) giving the Linear + routing path; a CUDA graph of the kernels
  replayed on new inputs;
- a 2-layer model at 8x7B attention shapes: logits with the kernels against the reference backend.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from gpu_testing import NAME, STEP, capture, randn, rel_err, within_steps

from mixtral.kernels import reference
from mixtral.kernels.config import KernelConfig
from mixtral.kernels.dispatch import GATE_FUSED_MAX_TOKENS, SKINNY_MAX_ROWS, Kernels
from mixtral.model.layers import rope_cos_sin
from mixtral.model.presets import preset

pytestmark = pytest.mark.gpu

DIM, N_HEADS, N_KV, HEAD_DIM, N_EXPERTS, TOP_K, EPS = 4096, 32, 8, 128, 8, 2, 1e-5
BATCHES = [1, 2, 3, 7, 8, 16, 37, 64, 100, 128, 256, 333, 512]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
ROUTE_TOL = 1e-5  # fp32 routing weights: Triton's exp and PyTorch's differ by a few ulps


def qk_inputs(gen: torch.Generator, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """q [N, H, hd], k [N, KV, hd], v [N, KV, hd] as views of one fused qkv row; cos/sin [N, hd] at random
    positions up to 32K."""
    qkv = randn(gen, n, (N_HEADS + 2 * N_KV) * HEAD_DIM, dtype=dtype)
    q, k, v = qkv.split([N_HEADS * HEAD_DIM, N_KV * HEAD_DIM, N_KV * HEAD_DIM], dim=-1)
    pos = torch.randint(0, 32768, (n,), device=gen.device, generator=gen)
    cos, sin = rope_cos_sin(pos, HEAD_DIM, 1e6, dtype)
    return q.view(n, N_HEADS, HEAD_DIM), k.view(n, N_KV, HEAD_DIM), v.view(n, N_KV, HEAD_DIM), cos, sin


def norm_weight(gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return (torch.rand(DIM, device=gen.device, generator=gen) + 0.5).to(dtype)  # [D]


def routing_agrees(ids: torch.Tensor, weights: torch.Tensor, logits: torch.Tensor) -> tuple[bool, bool]:
    """(ids equal to the reference's top-k of ``logits``, up to exact ties; weights within ROUTE_TOL)."""
    ref_w, ref_ids = reference.route_topk(logits, TOP_K)
    probs = torch.softmax(logits.float(), dim=-1)  # [N, E]
    # Exact ties (frequent for bf16 logits) may be ordered differently by torch.topk: accept either id.
    ids_ok = bool(((ids == ref_ids) | (probs.gather(1, ids) == probs.gather(1, ref_ids))).all())
    return ids_ok, bool(((weights - ref_w).abs() <= ROUTE_TOL * (1 + ref_w.abs())).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=NAME.get)
def test_rms_norm_and_add_rms_norm(kernels: SimpleNamespace, kernel_ops: Kernels, gen: torch.Generator,
                                   dtype: torch.dtype) -> None:
    bad = []
    for n in BATCHES:
        x, res = randn(gen, n, DIM, dtype=dtype, scale=3.0), randn(gen, n, DIM, dtype=dtype)  # [N, D]
        w = norm_weight(gen, dtype)
        out = kernels.rmsnorm.rms_norm(x, w, EPS)
        ok, err = within_steps(out, reference.rms_norm_reference(x, w, EPS), dtype)
        normed, summed = kernels.rmsnorm.add_rms_norm(x, res, w, EPS)
        ref_normed, ref_sum = reference.add_rms_norm_reference(x, res, w, EPS)
        ok2, err2 = within_steps(normed, ref_normed, dtype)
        with torch.inference_mode():
            dispatched = torch.equal(kernel_ops.rms_norm(x, w, EPS), out) and torch.equal(
                kernel_ops.add_rms_norm(x, res, w, EPS)[0], normed)
        if not (ok and ok2 and torch.equal(summed, ref_sum) and dispatched):
            bad.append(f"N {n}: rms_norm {err:.2e}, add_rms_norm {err2:.2e}, sum exact "
                       f"{torch.equal(summed, ref_sum)}, dispatched {dispatched}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("dtype", DTYPES, ids=NAME.get)
def test_rope_bit_identical(kernels: SimpleNamespace, kernel_ops: Kernels, gen: torch.Generator,
                            dtype: torch.dtype) -> None:
    bad = []
    for n in BATCHES:
        q, k, _, cos, sin = qk_inputs(gen, n, dtype)
        q_out, k_out = kernels.rope.rope_qk(q, k, cos, sin)
        q_ref, k_ref = reference.rope_qk_reference(q, k, cos, sin)
        with torch.inference_mode():
            dispatched = torch.equal(kernel_ops.rope_qk(q, k, cos, sin)[0], q_out)
        if not (torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref) and dispatched):
            bad.append(f"N {n}: q {(q_out.double() - q_ref.double()).abs().max().item():.2e}, "
                       f"k {(k_out.double() - k_ref.double()).abs().max().item():.2e}, dispatched {dispatched}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("dtype", DTYPES, ids=NAME.get)
def test_rope_with_kv_store_equals_rope_then_write_kv(kernels: SimpleNamespace, kernel_ops: Kernels,
                                                      gen: torch.Generator, dtype: torch.dtype) -> None:
    """One kernel rotates q/k and stores k/v at their slots (-1 skips): the same bits as the two steps."""
    blocks, bs = 64, 16
    for n in (1, 8, 300):
        q, k, v, cos, sin = qk_inputs(gen, n, dtype)
        slots = torch.randperm(blocks * bs, device=gen.device, generator=gen)[:n]
        slots[::5] = -1
        caches = [randn(gen, blocks, bs, N_KV, HEAD_DIM, dtype=dtype) for _ in range(2)]
        expect = [c.clone() for c in caches]
        q_out, k_out = kernels.rope.rope_qk(q, k, cos, sin, cache=(v, caches[0], caches[1], slots))
        q_ref, k_ref = reference.rope_qk_reference(q, k, cos, sin)
        reference.write_kv_reference(k_ref, v, expect[0], expect[1], slots)
        assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref), f"N {n}: rotation"
        assert torch.equal(caches[0], expect[0]) and torch.equal(caches[1], expect[1]), f"N {n}: K/V store"
        with torch.inference_mode():
            again = [c.clone() for c in expect]
            kernel_ops.rope_qk_store(q, k, v, cos, sin, again[0], again[1], slots)
        assert torch.equal(again[0], expect[0]) and torch.equal(again[1], expect[1]), f"N {n}: Kernels.rope_qk_store"


@pytest.mark.parametrize("dtype", DTYPES, ids=NAME.get)
def test_route_topk(kernels: SimpleNamespace, kernel_ops: Kernels, gen: torch.Generator, dtype: torch.dtype) -> None:
    bad = []
    for n in BATCHES:
        logits = randn(gen, n, N_EXPERTS, dtype=dtype, scale=2.0)  # [N, E] in the model dtype, as the gate gives
        w, ids = kernels.router.route_topk_fused(logits, TOP_K)
        ids_ok, w_ok = routing_agrees(ids, w, logits)
        with torch.inference_mode():
            dispatched = torch.equal(kernel_ops.route_topk(logits, TOP_K)[1], ids)
        if not (ids_ok and w_ok and dispatched):
            bad.append(f"N {n}: ids {ids_ok}, weights {w_ok}, dispatched {dispatched}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("dtype", DTYPES, ids=NAME.get)
@pytest.mark.parametrize("dim", [4096, 6144])
def test_fused_router(kernels: SimpleNamespace, kernel_ops: Kernels, gen: torch.Generator, dtype: torch.dtype,
                      dim: int) -> None:
    """Gate GEMV + routing + counts in one kernel: logits within two rounding steps of the Linear's, routing
    exactly that of its own logits, counts exactly the (unmasked) choices. The default dispatch runs it;
    ``KernelConfig(fused_gate=False)`` runs the Linear, the routing kernel and an ``index_add`` instead."""
    bad = []
    gate_off = Kernels(KernelConfig(fused_gate=False))
    for n in [b for b in BATCHES if b <= GATE_FUSED_MAX_TOKENS]:
        x = randn(gen, n, dim, dtype=dtype)  # [N, D]
        gw = randn(gen, N_EXPERTS, dim, dtype=dtype, scale=dim**-0.5)  # [E, D]
        for mask in (None, (torch.arange(n, device=x.device) % 5 != 4).long()):  # every fifth row padding
            counts = torch.zeros(N_EXPERTS, dtype=torch.int64, device=x.device)
            logits, w, ids = kernels.gate_router.gate_route_fused(x, gw, TOP_K, counts, mask)
            ok_logits, err = within_steps(logits, torch.nn.functional.linear(x.float(), gw.float()).to(dtype), dtype)
            ids_ok, w_ok = routing_agrees(ids, w, logits)
            keep = torch.ones(n, dtype=torch.bool, device=x.device) if mask is None else mask.bool()
            chosen = ids[keep].reshape(-1)
            want = torch.zeros_like(counts).index_add_(0, chosen, torch.ones_like(chosen))
            if not (ok_logits and ids_ok and w_ok and torch.equal(counts, want)):
                bad.append(f"N {n} mask {mask is not None}: logits {err:.2e}, ids {ids_ok}, weights {w_ok}, "
                           f"counts {counts.tolist()} want {want.tolist()}")
        with torch.inference_mode():
            counts = torch.zeros(N_EXPERTS, dtype=torch.int64, device=x.device)
            dispatched = torch.equal(kernel_ops.gate_route(x, gw, TOP_K, counts)[2], ids)
            # fused_gate=False: the Linear, then route_topk's kernel on its logits, and the counts by index_add
            off_counts = torch.zeros_like(counts)
            off = gate_off.gate_route(x, gw, TOP_K, off_counts)
            linear = torch.nn.functional.linear(x, gw)  # [N, E]
            want_off = (linear, *kernels.router.route_topk_fused(linear, TOP_K))
        if not dispatched:
            bad.append(f"N {n}: Kernels.gate_route did not run the fused kernel")
        if not (all(torch.equal(a, b) for a, b in zip(off, want_off, strict=True))
                and torch.equal(off_counts, torch.bincount(off[2].reshape(-1), minlength=N_EXPERTS))):
            bad.append(f"N {n}: Kernels(fused_gate=False).gate_route is not the Linear + routing path")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=NAME.get)
def test_skinny_gemm(kernels: SimpleNamespace, kernel_ops: Kernels, gen: torch.Generator, dtype: torch.dtype) -> None:
    """Decode-size GEMM at 8x7B's wqkv and wo shapes: relative error of one rounding of the output."""
    bad = []
    assert SKINNY_MAX_ROWS <= kernels.skinny_gemm.MAX_ROWS  # the dispatch never asks the kernel for more rows
    for n in [b for b in BATCHES if b <= SKINNY_MAX_ROWS]:
        for rows, cols in ((6144, 4096), (4096, 4096)):
            x = randn(gen, n, cols, dtype=dtype)
            w = randn(gen, rows, cols, dtype=dtype, scale=cols**-0.5)
            out = kernels.skinny_gemm.skinny_gemm(x, w)
            err = rel_err(out, x.float() @ w.float().T)
            with torch.inference_mode():
                dispatched = torch.equal(kernel_ops.linear(x, w), out)
            if not (err < STEP[dtype] and dispatched):
                bad.append(f"N {n} [{rows}, {cols}]: rel err {err:.2e}, dispatched {dispatched}")
    assert not bad, "\n".join(bad)


def test_graph_replay(kernels: SimpleNamespace, gen: torch.Generator) -> None:
    """The kernels captured in one CUDA graph, replayed on new contents of the captured inputs, give what
    eager calls give on those inputs."""
    n, dtype = 8, torch.bfloat16
    x, res = randn(gen, n, DIM, dtype=dtype), randn(gen, n, DIM, dtype=dtype)
    w = norm_weight(gen, dtype)
    q, k, _, cos, sin = qk_inputs(gen, n, dtype)
    logits = randn(gen, n, N_EXPERTS, dtype=dtype, scale=2.0)
    gw = randn(gen, N_EXPERTS, DIM, dtype=dtype, scale=DIM**-0.5)
    wqkv = randn(gen, 6144, DIM, dtype=dtype, scale=DIM**-0.5)

    def step() -> tuple[torch.Tensor, ...]:
        return (kernels.rmsnorm.rms_norm(x, w, EPS), *kernels.rmsnorm.add_rms_norm(x, res, w, EPS),
                *kernels.rope.rope_qk(q, k, cos, sin), *kernels.router.route_topk_fused(logits, TOP_K),
                *kernels.gate_router.gate_route_fused(x, gw, TOP_K), kernels.skinny_gemm.skinny_gemm(x, wqkv))

    graph, outs = capture(step)
    for t in (x, res, q, k, logits):  # new contents in the captured buffers (q/k refill their qkv rows)
        t.copy_(torch.randn(t.shape, device=gen.device, generator=gen).to(dtype))
    graph.replay()
    torch.cuda.synchronize()
    want = step()
    for i, (a, b) in enumerate(zip(outs, want, strict=True)):
        assert torch.equal(a, b), f"output {i} of the replay differs from eager"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=NAME.get)
def test_model_logits_kernels_against_reference(cuda: torch.device, build_model, kernel_choice,
                                                dtype: torch.dtype) -> None:
    """Two layers of 8x7B attention and norm shapes (experts narrowed to F 1024): fp32 logits with every kernel
    equal the reference backend's to 1e-4; in bf16 their error against the fp32 reference is no worse than
    the bf16 reference's own (a routing flip at a near-tie moves either a little, hence the slack)."""
    args = dataclasses.replace(preset("mixtral-8x7b"), n_layers=2, hidden_dim=1024, vocab_size=512)
    model = build_model(args, 0.02, seed=3).to(cuda)
    tokens = torch.randint(0, args.vocab_size, (4, 16), device=cuda, generator=torch.Generator(cuda).manual_seed(5))

    def logits(dt: torch.dtype, backend: str) -> torch.Tensor:
        with kernel_choice(model, backend=backend), torch.inference_mode():
            return model.to(dt)(tokens).double()

    truth = logits(torch.float32, "reference")
    fast = logits(dtype, "triton")
    assert torch.isfinite(fast).all()
    if dtype == torch.float32:
        assert rel_err(fast, truth) < 1e-4
    else:
        fast_err, ref_err = rel_err(fast, truth), rel_err(logits(dtype, "reference"), truth)
        assert fast_err <= 1.25 * ref_err + 1e-3, f"kernels {fast_err:.2e}, reference {ref_err:.2e}"
