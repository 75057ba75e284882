"""The prefill MoE path (kernels/triton/sorted_moe.py) against ``moe_reference`` on CPU via Triton's interpreter:
TMA descriptor loads and plain pointer loads, groups that end mid-tile, expert parallelism, its tile lookup,
its refusals and ``Kernels.moe_experts``' choice of it (``KernelConfig.moe_prefill``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mixtral.kernels import dispatch
from mixtral.kernels.config import KernelConfig
from mixtral.kernels.dispatch import Kernels
from mixtral.kernels.reference import moe_reference, route_topk
from mixtral.kernels.triton import moe_configs as mc
from mixtral.kernels.triton import persistent_moe
from mixtral.kernels.triton import sorted_moe as sm

SMALL = mc.MoEConfig(16, mc.GemmConfig(32, 32, 4, 2), mc.GemmConfig(32, 32, 4, 2))


def _problem(n: int, e: int, d: int, f: int, k: int, seed: int, dtype: torch.dtype = torch.float32,
             num_global: int | None = None) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen).to(dtype)
    w13 = (torch.randn(e, 2 * f, d, generator=gen) / d**0.5).to(dtype)  # [E, 2F, D]
    w2 = (torch.randn(e, d, f, generator=gen) / f**0.5).to(dtype)  # [E, D, F]
    weights, ids = route_topk(torch.randn(n, num_global or e, generator=gen), k)
    return x, w13, w2, weights, ids


def _grouped(counts: list[int], e_local: int, expert_start: int, d: int, f: int, seed: int
             ) -> tuple[torch.Tensor, ...]:
    """Routing with exactly ``counts[e]`` pairs for expert e (k = 2, shuffled), and this rank's experts
    ``expert_start`` .. + ``e_local``: (x, w13, w2, weights, ids, the reference's output)."""
    pairs = sum(counts)
    ids = torch.cat([torch.full((c,), e) for e, c in enumerate(counts)])[torch.randperm(pairs)].view(-1, 2)
    x, w13, w2, weights, _ = _problem(pairs // 2, len(counts), d, f, 2, seed=seed)
    local = slice(expert_start, expert_start + e_local)
    w13, w2 = w13[local].contiguous(), w2[local].contiguous()
    return x, w13, w2, weights, ids, moe_reference(x, w13, w2, weights, ids, expert_start)


@pytest.mark.parametrize("use_tma", [True, False])
@pytest.mark.parametrize(("n", "e", "d", "f", "k", "seed"), [
    (1, 8, 32, 64, 2, 0),  # one token: two groups of one row, each a mostly-empty tile
    (37, 4, 64, 96, 2, 1),  # ragged: groups end mid-tile and tiles run into the next expert's rows
    (70, 8, 64, 32, 3, 2),  # top-3, more row tiles than experts
])
def test_matches_reference(use_tma: bool, n: int, e: int, d: int, f: int, k: int, seed: int) -> None:
    x, w13, w2, weights, ids = _problem(n, e, d, f, k, seed)
    got = sm.sorted_moe(x, w13, w2, weights, ids, config=SMALL, use_tma=use_tma)
    torch.testing.assert_close(got, moe_reference(x, w13, w2, weights, ids), rtol=1e-4, atol=1e-5)


def test_fp16_and_wide_tiles() -> None:
    """fp16 operands with 64-wide column tiles and a 32-row block: one rounding of act and of y, as the
    reference rounds them."""
    x, w13, w2, weights, ids = _problem(45, 8, 64, 128, 2, seed=3, dtype=torch.float16)
    cfg = mc.MoEConfig(32, mc.GemmConfig(64, 32, 4, 2), mc.GemmConfig(64, 32, 4, 2))
    got = sm.sorted_moe(x, w13, w2, weights, ids, config=cfg).double()
    ref = moe_reference(x.double(), w13.double(), w2.double(), weights, ids)
    assert ((got - ref).norm() / ref.norm()).item() < 2e-3


def test_expert_parallel_slices_sum_to_the_whole() -> None:
    """Each rank's half adds only its experts' pairs; an expert nobody chose and an empty batch work."""
    x, w13, w2, weights, ids = _problem(50, 8, 32, 64, 2, seed=4)
    parts = [sm.sorted_moe(x, w13[s:s + 4], w2[s:s + 4], weights, ids, s, config=SMALL) for s in (0, 4)]
    torch.testing.assert_close(parts[0] + parts[1], moe_reference(x, w13, w2, weights, ids), rtol=1e-4, atol=1e-5)
    only0 = torch.zeros_like(ids)
    torch.testing.assert_close(sm.sorted_moe(x, w13, w2, weights, only0, config=SMALL),
                               moe_reference(x, w13, w2, weights, only0), rtol=1e-4, atol=1e-5)
    assert sm.sorted_moe(x[:0], w13, w2, weights[:0], ids[:0], config=SMALL).shape == (0, 32)


def test_refuses_shapes_the_tiles_do_not_fit() -> None:
    x, w13, w2, weights, ids = _problem(8, 4, 32, 48, 2, seed=5)  # F = 48 is not a multiple of 32
    with pytest.raises(ValueError, match="F=48 is not a multiple of the tile 32"):
        sm.sorted_moe(x, w13, w2, weights, ids, config=SMALL)
    x, w13, w2, weights, ids = _problem(8, 4, 32, 64, 2, seed=5)
    with pytest.raises(ValueError, match="must be contiguous"):
        sm.sorted_moe(x, w13.transpose(0, 1).contiguous().transpose(0, 1), w2, weights, ids, config=SMALL)
    with pytest.raises(ValueError, match="x \\[N, D\\]"):
        sm.sorted_moe(x[None], w13, w2, weights, ids, config=SMALL)


def test_config_lookup_nearest_token_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sorted_ table is read for the nearest M; the decode kernel's table for the same shape is not."""
    monkeypatch.setattr(mc, "CONFIG_DIR", tmp_path)
    mc.clear_config_cache()
    small = mc.MoEConfig(64, mc.GemmConfig(64, 64, 4, 4), mc.GemmConfig(128, 64, 8, 3))
    large = mc.MoEConfig(128, mc.GemmConfig(128, 64, 8, 4), mc.GemmConfig(256, 64, 8, 3))
    decode = mc.MoEConfig(16, mc.GemmConfig(32, 256, 4, 3), mc.GemmConfig(64, 256, 4, 3))
    name = mc.config_path(8, 256, 128, "cpu", "sorted_").name
    assert name == "sorted_E8_F256_D128_cpu.json"
    (tmp_path / name).write_text(json.dumps({"configs": {"1024": small.to_dict(), "8192": large.to_dict()}}))
    (tmp_path / mc.config_path(8, 256, 128, "cpu").name).write_text(json.dumps({"configs": {"1": decode.to_dict()}}))
    cpu = torch.device("cpu")
    assert mc.get_sorted_config(8, 256, 128, 2048, torch.bfloat16, cpu) == small
    assert mc.get_sorted_config(8, 256, 128, 6000, torch.bfloat16, cpu) == large
    assert mc.get_config(8, 256, 128, 2048, torch.bfloat16, cpu) == decode
    # Another shape has no table: the default tiles; 4-byte dtypes never take tuned (bf16-sized) tiles.
    assert mc.get_sorted_config(8, 512, 128, 2048, torch.bfloat16, cpu) == mc.default_sorted_config(torch.bfloat16)
    assert mc.get_sorted_config(8, 256, 128, 2048, torch.float32, cpu) == mc.default_sorted_config(torch.float32)
    mc.clear_config_cache()


def test_moe_experts_take_it_from_the_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernels.moe_experts as on an sm90 GPU with CPU tensors (the triton backend runs the interpreter): the
    sorted path from SORTED_MIN_TOKENS, the decode kernel below it or with moe_prefill='triton'; 'persistent'
    takes the sorted path with persistent tiles on both GEMMs; 4-byte dtypes stay off it."""
    from mixtral.kernels.triton import fused_moe as fm

    calls: list[str] = []
    configs: list[mc.MoEConfig] = []
    real_sorted = sm.sorted_moe

    def sorted_spy(*a: object, config: mc.MoEConfig, pdl: bool) -> torch.Tensor:
        calls.append("sorted")
        configs.append(config)
        return real_sorted(*a, config=SMALL, pdl=pdl)  # type: ignore[arg-type]

    monkeypatch.setattr(dispatch, "_sm90", lambda device: True)
    monkeypatch.setattr(dispatch, "SORTED_MIN_TOKENS", 32)
    monkeypatch.setattr(sm, "sorted_moe", sorted_spy)
    monkeypatch.setattr(fm, "fused_moe", lambda *a, pdl: calls.append("triton") or moe_reference(*a))
    monkeypatch.setattr(mc, "get_sorted_config", lambda *a: SMALL)
    kernels = Kernels(KernelConfig(backend="triton"))
    x, w13, w2, weights, ids = _problem(40, 8, 32, 64, 2, seed=6, dtype=torch.float16)
    out = kernels.moe_experts(x, w13, w2, weights, ids)
    ref = moe_reference(x.double(), w13.double(), w2.double(), weights, ids)
    assert calls == ["sorted"] and configs == [SMALL] and ((out.double() - ref).norm() / ref.norm()).item() < 2e-3
    kernels.moe_experts(x[:31], w13, w2, weights[:31], ids[:31])
    assert calls[-1] == "triton"
    Kernels(KernelConfig(backend="triton", moe_prefill="triton")).moe_experts(x, w13, w2, weights, ids)
    assert calls[-1] == "triton"
    Kernels(KernelConfig(backend="triton", moe_prefill="persistent")).moe_experts(x, w13, w2, weights, ids)
    assert calls[-1] == "sorted" and configs[-1].w13.persistent and configs[-1].w2.persistent
    assert (configs[-1].block_m, configs[-1].w13.block_n) == (SMALL.block_m, SMALL.w13.block_n)
    assert kernels.sorted_config(x.float(), w13.float(), w2.float()) is None
    assert kernels.sorted_config(x, w13, w2) == SMALL


def test_persistent_config_drops_paired_short_tiles() -> None:
    """moe_prefill='persistent' forces persistent tiles: w2's paired short tiles (non-persistent only) go."""
    paired = mc.MoEConfig(128, mc.GemmConfig(128, 64, 8, 3, joint=True),
                          mc.GemmConfig(128, 64, 8, 3, pair_small=True), 64)
    forced = dispatch._all_persistent(paired)
    assert forced.w13.persistent and forced.w13.joint and forced.w2.persistent and not forced.w2.pair_small
    assert forced.small_m == 64 and forced.block_m == 128


def test_moe_experts_fall_back_for_tiles_that_do_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A prefill-sized batch whose F is no multiple of the sorted tiles takes the decode kernel."""
    from mixtral.kernels.triton import fused_moe as fm

    calls: list[str] = []
    monkeypatch.setattr(dispatch, "_sm90", lambda device: True)
    monkeypatch.setattr(dispatch, "SORTED_MIN_TOKENS", 32)
    monkeypatch.setattr(fm, "fused_moe", lambda *a, pdl: calls.append("triton") or moe_reference(*a))
    monkeypatch.setattr(mc, "get_sorted_config", lambda *a: SMALL)
    x, w13, w2, weights, ids = _problem(40, 8, 32, 48, 2, seed=13, dtype=torch.float16)  # F = 48: no 32-wide tile
    Kernels(KernelConfig(backend="triton")).moe_experts(x, w13, w2, weights, ids)
    assert calls == ["triton"]


@pytest.mark.parametrize(("n", "e_local", "k", "expert_start"), [
    (1, 8, 2, 0), (37, 8, 2, 0), (700, 8, 2, 0),  # 1400 pairs: three 512-pair chunks carry their counts
    (50, 4, 2, 4), (9, 2, 3, 2),  # expert parallel: other ranks' pairs sort last and leave offs alone
])
def test_triton_sort_pairs_equals_the_torch_sort(n: int, e_local: int, k: int, expert_start: int) -> None:
    from mixtral.kernels.triton.moe_align import sort_pairs as sort_pairs_triton
    from mixtral.kernels.triton.moe_glue import sort_pairs

    _, ids = route_topk(torch.randn(n, 8, generator=torch.Generator().manual_seed(n)), k)
    want = sort_pairs(ids, e_local, expert_start)  # CPU: torch.sort, searchsorted, scatter
    got = sort_pairs_triton(ids, e_local, expert_start)
    for name, w, g in zip(("order", "row_of_pair", "offs"), want, got, strict=True):
        assert g.dtype == torch.int32 and torch.equal(g.long(), w.long()), name


def test_small_tiles_take_short_remainders() -> None:
    """With 32-row tiles and small_m 16: a group of 40 rows is one 32-row tile and one 16-row tile (remainder
    8), a group of 60 two 32-row tiles (remainder 28 > 16 stays a big tile), a group of 32 one tile, and an
    empty group none; every row is computed exactly once either way."""
    counts = [40, 60, 32, 0]
    ids = torch.cat([torch.full((c,), e) for e, c in enumerate(counts)])[torch.randperm(132)].view(66, 2)
    x, w13, w2, weights, _ = _problem(66, 4, 32, 64, 2, seed=7)
    ref = moe_reference(x, w13, w2, weights, ids)
    for small_m in (0, 16):
        cfg = mc.MoEConfig(32, mc.GemmConfig(32, 32, 4, 2), mc.GemmConfig(32, 32, 4, 2), small_m)
        for use_tma in (True, False):
            got = sm.sorted_moe(x, w13, w2, weights, ids, config=cfg, use_tma=use_tma)
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    bad = mc.MoEConfig(32, mc.GemmConfig(32, 32, 4, 2), mc.GemmConfig(32, 32, 4, 2), 32)
    with pytest.raises(ValueError, match="small_m=32 must be a power of two from 16 to below block_m=32"):
        sm.sorted_moe(x, w13, w2, weights, ids, config=bad)


PERSISTENT = mc.GemmConfig(32, 32, 4, 2, persistent=True)


@pytest.mark.parametrize(("small_m", "programs"), [(0, 1), (16, 3)])
@pytest.mark.parametrize(("counts", "e_local", "expert_start"), [
    ([40, 60, 32, 0], 4, 0),  # ragged groups, an exact tile, an empty expert last
    ([0, 5, 0, 0, 90, 1], 6, 0),  # empty experts first and between (they own no tiles); E not a power of 2
    ([17, 0, 33, 70], 2, 2),  # expert parallel: rank 1's two experts, the others' pairs never multiplied
])
def test_persistent_gemms_walk_every_tile_once(small_m: int, programs: int, counts: list[int], e_local: int,
                                               expert_start: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The persistent kernels (one or three programs walking 5-20 tiles each) give the reference's result for
    both GEMMs, alone or beside a non-persistent one, with groups of every shape and with or without the
    short last tiles (which only the non-persistent kernel splits off): a tile computed twice or skipped
    would show in the sum."""
    monkeypatch.setattr(persistent_moe, "num_sms", lambda device: programs)
    x, w13, w2, weights, ids, ref = _grouped(counts, e_local, expert_start, 32, 64, seed=8)
    plain = mc.GemmConfig(32, 32, 4, 2)
    for w13_cfg, w2_cfg in ((PERSISTENT, PERSISTENT), (PERSISTENT, plain), (plain, PERSISTENT)):
        cfg = mc.MoEConfig(32, w13_cfg, w2_cfg, small_m)
        got = sm.sorted_moe(x, w13, w2, weights, ids, expert_start, config=cfg)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_persistent_needs_tma_else_takes_the_plain_kernel() -> None:
    """Without TMA (sm80) a persistent config runs the non-persistent pointer-load kernel: same result."""
    x, w13, w2, weights, ids = _problem(37, 4, 64, 96, 2, seed=9)
    cfg = mc.MoEConfig(16, PERSISTENT, PERSISTENT)
    torch.testing.assert_close(sm.sorted_moe(x, w13, w2, weights, ids, config=cfg, use_tma=False),
                               moe_reference(x, w13, w2, weights, ids), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("use_tma", [True, False])
@pytest.mark.parametrize(("counts", "e_local", "expert_start"), [
    ([40, 60, 32, 0], 4, 0),  # short last blocks (8, 12 rows), a group of whole tiles, an empty expert
    ([0, 5, 0, 0, 90, 1], 6, 0),  # a group that is only a short tile, empty experts first and between
    ([17, 0, 33, 70], 2, 2),  # expert parallel: rank 1's two experts, the others' pairs never multiplied
])
def test_paired_short_tiles_cover_both_columns(use_tma: bool, counts: list[int], e_local: int, expert_start: int
                                               ) -> None:
    """w2's short tiles spanning two column tiles (``pair_small``) give the reference's result: a column the
    pair missed or wrote twice, or a big tile skipped by the new order, would show. w2 has 4 column tiles here
    (D 128 / 32), so two pairs an expert."""
    x, w13, w2, weights, ids, ref = _grouped(counts, e_local, expert_start, 128, 64, seed=14)
    cfg = mc.MoEConfig(32, mc.GemmConfig(32, 32, 4, 2), mc.GemmConfig(32, 32, 4, 2, pair_small=True), 16)
    got = sm.sorted_moe(x, w13, w2, weights, ids, expert_start, config=cfg, use_tma=use_tma)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_paired_short_tiles_refusals() -> None:
    x, w13, w2, weights, ids = _problem(20, 4, 96, 64, 2, seed=15)
    tile, paired = mc.GemmConfig(32, 32, 4, 2), mc.GemmConfig(32, 32, 4, 2, pair_small=True)
    for cfg, says in ((mc.MoEConfig(32, tile, paired, 0), r"needs short tiles \(small_m > 0, got 0\)"),
                      (mc.MoEConfig(32, tile, paired, 16), r"even number of column tiles \(D=96 // 32 = 3\)"),
                      (mc.MoEConfig(32, paired, tile, 16), "pair_small is for w2 only")):
        with pytest.raises(ValueError, match=says):
            sm.sorted_moe(x, w13, w2, weights, ids, config=cfg)


def test_paired_short_tiles_keep_to_shared_memory() -> None:
    """A paired short tile holds twice the weight rows a stage: fewer stages where the config's would not fit."""
    assert sm._pair_stages(mc.GemmConfig(256, 64, 8, 4), 64, 2) == 3  # 72 KB a stage: 3 fit in 227 KB
    assert sm._pair_stages(mc.GemmConfig(128, 64, 8, 4), 64, 2) == 4  # 40 KB a stage


@pytest.mark.parametrize("use_tma", [True, False])
@pytest.mark.parametrize(("counts", "e_local", "expert_start", "small_m"), [
    ([40, 60, 32, 0], 4, 0, 16),  # short last blocks (8, 12 rows), a group of whole tiles, an empty expert
    ([0, 5, 0, 0, 90, 1], 6, 0, 0),  # a group of one short block, empty experts first and between; no short tiles
    ([17, 0, 33, 70], 2, 2, 16),  # expert parallel: rank 1's two experts, the others' pairs never multiplied
])
def test_joint_w13_multiplies_gate_and_up_in_one_operand(use_tma: bool, counts: list[int], e_local: int,
                                                         expert_start: int, small_m: int) -> None:
    """w13 with ``joint`` (w1's and w3's column tiles loaded as one [2 BN, BK] operand, through a 3-D TMA box
    over w13 as [E * 2, F, D] or gathered pointers) gives the reference's result: a w3 tile taken from the
    wrong expert or column, or gate and up swapped in the split, would show. F = 64 holds two column tiles."""
    x, w13, w2, weights, ids, ref = _grouped(counts, e_local, expert_start, 32, 64, seed=16)
    cfg = mc.MoEConfig(32, mc.GemmConfig(32, 32, 4, 2, joint=True), mc.GemmConfig(32, 32, 4, 2), small_m)
    got = sm.sorted_moe(x, w13, w2, weights, ids, expert_start, config=cfg, use_tma=use_tma)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    if use_tma:  # the persistent kernel's joint loop (TMA only), walked by three programs
        cfg = mc.MoEConfig(32, mc.GemmConfig(32, 32, 4, 2, joint=True, persistent=True), mc.GemmConfig(32, 32, 4, 2))
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(persistent_moe, "num_sms", lambda device: 3)
            got = sm.sorted_moe(x, w13, w2, weights, ids, expert_start, config=cfg, use_tma=True)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_joint_refusals() -> None:
    x, w13, w2, weights, ids = _problem(20, 4, 64, 64, 2, seed=17)
    tile, joint = mc.GemmConfig(32, 32, 4, 2), mc.GemmConfig(32, 32, 4, 2, joint=True)
    with pytest.raises(ValueError, match="joint is for w13 only"):
        sm.sorted_moe(x, w13, w2, weights, ids, config=mc.MoEConfig(32, tile, joint))
