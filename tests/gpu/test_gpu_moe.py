"""The MoE kernels on a GPU against ``moe_reference`` computed in fp32 from the same inputs.

- the decode kernel (``triton/fused_moe.py``) at Mixtral-8x7B (D 4096, F 14336) and 8x22B (D 6144, F 16384)
  expert shapes, batch 1..512, bf16 and fp16, expert parallel, and fp32 at the mid model's shapes;
- the prefill GEMMs (``triton/sorted_moe.py``, ``persistent_moe.py``) with every entry of every shipped tile
  table at its token count (persistent, joint w13, paired w2 short tiles, warp specialisation), with pointer
  loads instead of TMA, and expert parallel;
- ``Kernels.moe_experts`` following ``KernelConfig.moe_prefill`` at a prefill size (``sorted``: the table's
  tiles; ``persistent``: the same GEMMs with persistent tiles on both, held to the reference at every token
  count the tables list and expert parallel; ``triton``: the decode kernel), bit for bit the kernel it chose;
- a 2-layer model at a prefill size with each ``moe_prefill`` choice against the reference backend.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from gpu_testing import TOL, randn, rel_err

from mixtral.kernels.config import MOE_PREFILL, KernelConfig
from mixtral.kernels.dispatch import SORTED_MIN_TOKENS, Kernels
from mixtral.kernels.reference import moe_reference, route_topk
from mixtral.kernels.triton.moe_configs import CONFIG_DIR, MoEConfig, get_config, get_sorted_config
from mixtral.model.presets import preset

pytestmark = pytest.mark.gpu

SHAPES = {"8x7b": (4096, 14336), "8x22b": (6144, 16384)}  # D, F; E = 8, top-2
SORTED_TABLES = sorted(CONFIG_DIR.glob("sorted_E8_F14336_D4096_*.json"))
Kernel = Callable[..., torch.Tensor]


class Experts:
    """One model's expert weights in a 2-byte dtype [E, 2F, D] / [E, D, F] and their fp32 copies."""

    def __init__(self, d: int, f: int, dtype: torch.dtype, gen: torch.Generator) -> None:
        self.d, self.f = d, f
        self.w13 = randn(gen, 8, 2 * f, d, dtype=dtype, scale=d**-0.5)  # [E, 2F, D]
        self.w2 = randn(gen, 8, d, f, dtype=dtype, scale=f**-0.5)  # [E, D, F]
        self.w13_ref, self.w2_ref = self.w13.float(), self.w2.float()


@pytest.fixture(scope="module", params=list(SHAPES))
def experts(request: pytest.FixtureRequest, cuda: torch.device) -> Experts:
    d, f = SHAPES[request.param]
    return Experts(d, f, torch.bfloat16, torch.Generator(device=cuda).manual_seed(1234))


@pytest.fixture(scope="module")
def experts_8x7b(cuda: torch.device) -> Experts:
    return Experts(*SHAPES["8x7b"], torch.bfloat16, torch.Generator(device=cuda).manual_seed(99))


@pytest.fixture(scope="module")
def fused_moe(kernels: SimpleNamespace) -> Kernel:
    return kernels.fused_moe.fused_moe


@pytest.fixture(scope="module")
def sorted_moe(kernels: SimpleNamespace) -> Kernel:
    return kernels.sorted_moe.sorted_moe


def routed(gen: torch.Generator, n: int, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """x [n, D] and a top-2 routing of 8 experts from random logits: (x, weights [n, 2] fp32, ids [n, 2])."""
    x = randn(gen, n, d, dtype=dtype)
    weights, ids = route_topk(randn(gen, n, 8), 2)
    return x, weights, ids


def assert_matches_reference(out: torch.Tensor, x: torch.Tensor, e: Experts, weights: torch.Tensor,
                             ids: torch.Tensor, expert_start: int = 0, what: str = "") -> None:
    ref = moe_reference(x.float(), e.w13_ref[expert_start:], e.w2_ref[expert_start:], weights, ids, expert_start)
    err = rel_err(out, ref)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    assert err < TOL[x.dtype], f"{what}: relative error {err:.2e} >= {TOL[x.dtype]:.0e}"


@pytest.mark.parametrize("batch", [1, 2, 3, 8, 16, 64, 100, 256, 512])
def test_decode_kernel_bf16(fused_moe: Kernel, experts: Experts, gen: torch.Generator, batch: int) -> None:
    x, w, ids = routed(gen, batch, experts.d, torch.bfloat16)
    cfg = get_config(8, experts.f, experts.d, batch, torch.bfloat16, x.device)
    out = fused_moe(x, experts.w13, experts.w2, w, ids)
    assert_matches_reference(out, x, experts, w, ids, what=f"batch {batch}, {cfg}")


def test_decode_kernel_expert_parallel(fused_moe: Kernel, experts: Experts, gen: torch.Generator) -> None:
    """This rank holds experts 4..7 (a contiguous view of the same weights): other ranks' choices add nothing."""
    x, w, ids = routed(gen, 33, experts.d, torch.bfloat16)
    out = fused_moe(x, experts.w13[4:], experts.w2[4:], w, ids, 4)
    assert_matches_reference(out, x, experts, w, ids, expert_start=4, what="experts 4..7")


@pytest.mark.parametrize("batch", [1, 8, 16, 256])
def test_decode_kernel_fp16(fused_moe: Kernel, experts_8x7b: Experts, gen: torch.Generator, batch: int) -> None:
    e = experts_8x7b
    x, w, ids = routed(gen, batch, e.d, torch.float16)
    out = fused_moe(x, e.w13_ref.half(), e.w2_ref.half(), w, ids)
    assert_matches_reference(out, x, e, w, ids, what=f"fp16 batch {batch}")


@pytest.mark.parametrize("batch", [1, 8, 64, 300])
def test_decode_kernel_fp32(fused_moe: Kernel, cuda: torch.device, gen: torch.Generator, batch: int) -> None:
    """fp32 (the fp32 engine's MoE at every size) at the mid model's expert shapes, IEEE dots."""
    e = Experts(1024, 2048, torch.float32, gen)
    x, w, ids = routed(gen, batch, e.d, torch.float32)
    assert_matches_reference(fused_moe(x, e.w13, e.w2, w, ids), x, e, w, ids, what=f"fp32 batch {batch}")


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_decode_kernel_without_align_launch(fused_moe: Kernel, experts_8x7b: Experts, gen: torch.Generator,
                                            batch: int) -> None:
    """At batch 1-4 the pairs index their experts directly (no align launch): the same bits as the aligned layout."""
    e = experts_8x7b
    x, w, ids = routed(gen, batch, e.d, torch.bfloat16)
    direct = fused_moe(x, e.w13, e.w2, w, ids, direct=True)
    aligned = fused_moe(x, e.w13, e.w2, w, ids, direct=False)
    assert torch.equal(direct, aligned)
    assert_matches_reference(direct, x, e, w, ids, what=f"direct batch {batch}")


def _table_entries() -> list[tuple[str, int]]:
    return [(p.name, int(m)) for p in SORTED_TABLES for m in json.loads(p.read_text())["configs"]]


def test_the_shipped_tables_are_found() -> None:
    assert len(SORTED_TABLES) >= 2 and len(_table_entries()) >= 8


@pytest.mark.parametrize(("table", "tokens"), _table_entries())
def test_prefill_gemms_every_table_entry(sorted_moe: Kernel, experts_8x7b: Experts, gen: torch.Generator, table: str,
                                         tokens: int) -> None:
    """Each tile config a table ships (either GPU's: both are Hopper) at its own token count."""
    cfg = MoEConfig.from_dict(json.loads((CONFIG_DIR / table).read_text())["configs"][str(tokens)])
    e = experts_8x7b
    x, w, ids = routed(gen, tokens, e.d, torch.bfloat16)
    out = sorted_moe(x, e.w13, e.w2, w, ids, config=cfg)
    assert_matches_reference(out, x, e, w, ids, what=f"{table} at {tokens} tokens: {cfg}")


@pytest.mark.parametrize("tokens", [1024, 2048, 3000])
def test_prefill_gemms_pointer_loads(sorted_moe: Kernel, experts_8x7b: Experts, gen: torch.Generator,
                                     tokens: int) -> None:
    """The table's tiles with plain pointer loads instead of TMA descriptors (the variant compile_check builds
    for sm80; without warp specialisation), at a token count no table lists too."""
    e = experts_8x7b
    x, w, ids = routed(gen, tokens, e.d, torch.bfloat16)
    cfg = get_sorted_config(8, e.f, e.d, tokens, torch.bfloat16, x.device)
    cfg = replace(cfg, w13=replace(cfg.w13, warp_specialize=False), w2=replace(cfg.w2, warp_specialize=False))
    out = sorted_moe(x, e.w13, e.w2, w, ids, config=cfg, use_tma=False)
    assert_matches_reference(out, x, e, w, ids, what=f"pointer loads, {tokens} tokens")


def test_prefill_gemms_expert_parallel(sorted_moe: Kernel, experts_8x7b: Experts, gen: torch.Generator) -> None:
    """Two ranks of four experts each: each rank's output matches the reference's share, and they sum to it."""
    e = experts_8x7b
    x, w, ids = routed(gen, 2048, e.d, torch.bfloat16)
    halves = []
    for start in (0, 4):
        half = sorted_moe(x, e.w13[start:start + 4].contiguous(), e.w2[start:start + 4].contiguous(), w, ids, start)
        ref = moe_reference(x.float(), e.w13_ref[start:start + 4], e.w2_ref[start:start + 4], w, ids, start)
        assert rel_err(half, ref) < TOL[torch.bfloat16], f"experts {start}..{start + 3}"
        halves.append(half.float())
    whole = moe_reference(x.float(), e.w13_ref, e.w2_ref, w, ids)
    assert rel_err(halves[0] + halves[1], whole) < TOL[torch.bfloat16]


def all_persistent(cfg: MoEConfig) -> MoEConfig:
    """What ``moe_prefill='persistent'`` must run: ``cfg`` with persistent tiles on both GEMMs, and without
    w2's paired short tiles (a feature of the non-persistent kernel). Written out here, not taken from the
    dispatch, so the test checks the dispatch's own version."""
    return replace(cfg, w13=replace(cfg.w13, persistent=True), w2=replace(cfg.w2, persistent=True, pair_small=False))


def sm90(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


@pytest.mark.parametrize("choice", MOE_PREFILL)
def test_dispatch_follows_the_prefill_choice(fused_moe: Kernel, sorted_moe: Kernel, experts_8x7b: Experts,
                                             gen: torch.Generator, choice: str) -> None:
    """``Kernels.moe_experts`` at 2048 tokens with ``KernelConfig(moe_prefill=choice)`` runs the prefill GEMMs
    (sm90+) with the table's tiles (``sorted``) or with persistent tiles forced (``persistent``), or, asked for
    ``triton``, the decode kernel at every size: its output is that kernel's, bit for bit."""
    e = experts_8x7b
    x, w, ids = routed(gen, 2048, e.d, torch.bfloat16)
    dispatch = Kernels(KernelConfig(moe_prefill=choice))
    with torch.inference_mode():
        out = dispatch.moe_experts(x, e.w13, e.w2, w, ids)
    if choice != "triton" and sm90(x.device):
        table = get_sorted_config(8, e.f, e.d, 2048, torch.bfloat16, x.device)
        tiles = all_persistent(table) if choice == "persistent" else table
        assert dispatch.sorted_config(x, e.w13, e.w2) == tiles
        expect = sorted_moe(x, e.w13, e.w2, w, ids, config=tiles)
    else:  # the decode kernel: asked for, or no sorted GEMMs before sm90
        expect = fused_moe(x, e.w13, e.w2, w, ids)
    assert torch.equal(out, expect)
    assert_matches_reference(out, x, e, w, ids, what=f"Kernels.moe_experts, moe_prefill={choice}")


def _prefill_sizes() -> list[int]:
    """Every token count a shipped prefill table lists (each GPU's entries differ), and one none lists."""
    listed = {m for _, m in _table_entries() if m >= SORTED_MIN_TOKENS}
    return sorted(listed | {3000})


@pytest.mark.parametrize("tokens", _prefill_sizes())
def test_persistent_choice_holds_to_the_reference(sorted_moe: Kernel, experts_8x7b: Experts, gen: torch.Generator,
                                                  tokens: int) -> None:
    """``moe_prefill='persistent'`` at prefill sizes: the dispatch takes the table's entry for the token count
    with persistent tiles on both GEMMs (sm90+: the persistent kernels, TMA), and the result holds to the
    reference; the same bits as ``sorted_moe`` given those tiles."""
    e = experts_8x7b
    assert sm90(e.w13.device), "the persistent MoE kernels need sm90+ (TMA)"
    x, w, ids = routed(gen, tokens, e.d, torch.bfloat16)
    dispatch = Kernels(KernelConfig(moe_prefill="persistent"))
    tiles = dispatch.sorted_config(x, e.w13, e.w2)
    want = all_persistent(get_sorted_config(8, e.f, e.d, tokens, torch.bfloat16, x.device))
    assert tiles == want and tiles.w13.persistent and tiles.w2.persistent and not tiles.w2.pair_small, tiles
    with torch.inference_mode():
        out = dispatch.moe_experts(x, e.w13, e.w2, w, ids)
    assert_matches_reference(out, x, e, w, ids, what=f"persistent at {tokens} tokens: {tiles}")
    assert torch.equal(out, sorted_moe(x, e.w13, e.w2, w, ids, config=tiles))


def test_persistent_choice_expert_parallel(experts_8x7b: Experts, gen: torch.Generator) -> None:
    """Two ranks of four experts through ``moe_prefill='persistent'``: each rank's share matches the reference's,
    and the shares sum to the whole."""
    e = experts_8x7b
    x, w, ids = routed(gen, 2048, e.d, torch.bfloat16)
    dispatch = Kernels(KernelConfig(moe_prefill="persistent"))
    halves = []
    for start in (0, 4):
        w13, w2 = e.w13[start:start + 4].contiguous(), e.w2[start:start + 4].contiguous()
        tiles = dispatch.sorted_config(x, w13, w2)
        assert tiles is not None and tiles.w13.persistent and tiles.w2.persistent
        with torch.inference_mode():
            half = dispatch.moe_experts(x, w13, w2, w, ids, start)
        ref = moe_reference(x.float(), e.w13_ref[start:start + 4], e.w2_ref[start:start + 4], w, ids, start)
        assert rel_err(half, ref) < TOL[torch.bfloat16], f"experts {start}..{start + 3}"
        halves.append(half.float())
    whole = moe_reference(x.float(), e.w13_ref, e.w2_ref, w, ids)
    assert rel_err(halves[0] + halves[1], whole) < TOL[torch.bfloat16]


@pytest.mark.parametrize("choice", MOE_PREFILL)
def test_model_prefill_with_each_moe_choice(cuda: torch.device, build_model, kernel_choice, kernels: SimpleNamespace,
                                            monkeypatch: pytest.MonkeyPatch, choice: str) -> None:
    """A 2-layer model (8x7B attention and D, experts narrowed to F 1024) over one 1536-token prompt in bf16,
    its MoE layers at a prefill size: with ``moe_prefill=choice`` the layers ran the chosen kernel (the sorted
    GEMMs with the table's or persistent tiles, or never, for ``triton``), and each token's logits are as close
    to the fp32 reference backend's as the bf16 reference backend's are. Compared per token, by median and 99th
    percentile: a token whose top-2 experts sit at a near-tie can flip to other experts under any rounding (one
    of 1536 did in a CPU rehearsal, 0.39 off where the rest were 1e-3), and one such token would dominate a
    whole-tensor error."""
    assert sm90(cuda), "the prefill MoE GEMMs need sm90+"
    args = dataclasses.replace(preset("mixtral-8x7b"), n_layers=2, hidden_dim=1024, vocab_size=512)
    model = build_model(args, 0.02, seed=4).to(cuda)
    tokens = torch.randint(0, args.vocab_size, (1, 1536), device=cuda, generator=torch.Generator(cuda).manual_seed(6))
    assert tokens.numel() >= SORTED_MIN_TOKENS
    tiles_seen: list[MoEConfig] = []
    real = kernels.sorted_moe.sorted_moe

    def spy(*a: object, config: MoEConfig, **k: object) -> torch.Tensor:
        tiles_seen.append(config)
        return real(*a, config=config, **k)

    monkeypatch.setattr(kernels.sorted_moe, "sorted_moe", spy)  # the dispatch imports it at each call

    def logits(dt: torch.dtype, **choices: str) -> torch.Tensor:
        with kernel_choice(model, **choices), torch.inference_mode():
            return model.to(dt)(tokens)[0].double()  # [T, V]

    truth = logits(torch.float32, backend="reference")

    def per_token_err(out: torch.Tensor) -> torch.Tensor:
        return (out - truth).norm(dim=-1) / truth.norm(dim=-1)  # [T]

    ref = per_token_err(logits(torch.bfloat16, backend="reference"))
    assert not tiles_seen
    fast_logits = logits(torch.bfloat16, moe_prefill=choice)
    table = get_sorted_config(8, args.hidden_dim, args.dim, tokens.numel(), torch.bfloat16, cuda)
    want = {"sorted": [table] * 2, "persistent": [all_persistent(table)] * 2, "triton": []}[choice]
    assert tiles_seen == want, f"moe_prefill={choice}: sorted_moe ran with {tiles_seen}"
    assert torch.isfinite(fast_logits).all()
    fast = per_token_err(fast_logits)
    for q in (0.5, 0.99):
        f, r = fast.quantile(q).item(), ref.quantile(q).item()
        assert f <= 1.25 * r + 1e-3, f"moe_prefill={choice}: per-token error quantile {q} {f:.2e}, reference {r:.2e}"
