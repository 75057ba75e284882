"""Fused MoE Triton kernels (align + grouped GEMMs) against the PyTorch references, on CPU via the interpreter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mixtral.kernels import dispatch
from mixtral.kernels.config import KernelConfig
from mixtral.kernels.dispatch import Kernels
from mixtral.kernels.reference import moe_reference, route_topk
from mixtral.kernels.triton import fused_moe as fm
from mixtral.kernels.triton import moe_align as ma
from mixtral.kernels.triton import moe_configs as mc
from mixtral.kernels.triton import moe_sum as msum
from mixtral.model.moe import MoE
from mixtral.model.presets import preset

FP16_SMALL = mc.MoEConfig(16, mc.GemmConfig(32, 32), mc.GemmConfig(32, 32))


def _routing(n: int, num_experts: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return route_topk(torch.randn(n, num_experts, generator=gen), k)


def _weights(e: int, f: int, d: int, dtype: torch.dtype, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    w13 = (torch.randn(e, 2 * f, d, generator=gen) / d**0.5).to(dtype)  # [E, 2F, D]
    w2 = (torch.randn(e, d, f, generator=gen) / f**0.5).to(dtype)  # [E, D, F]
    return w13, w2


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize(("n", "k", "e_local", "expert_start", "block_m", "seed"), [
    (2, 2, 4, 0, 2, 0),  # the docstring's size
    (1, 2, 8, 0, 16, 1),  # batch-1 decode: two experts, two blocks
    (37, 2, 8, 0, 4, 2),  # chunk-free but ragged
    (300, 2, 6, 0, 16, 3),  # > one 512-pair chunk: the running counts carry across chunks
    (50, 3, 4, 4, 8, 4),  # expert parallel: this rank owns experts 4..7 of 8
])
def test_align_layout(n: int, k: int, e_local: int, expert_start: int, block_m: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    num_global = max(8, e_local + expert_start)
    _, ids = _routing(n, num_global, k, gen)
    sorted_ids, expert_ids, post_pad = ma.moe_align(ids, e_local, block_m, expert_start)
    num_pairs = n * k
    flat = ids.reshape(-1) - expert_start
    row = 0
    for e in range(e_local):
        pairs = torch.nonzero(flat == e).flatten()  # the pairs of e, in order (the sort is stable)
        padded = -(-pairs.numel() // block_m) * block_m
        assert sorted_ids[row:row + pairs.numel()].tolist() == pairs.tolist()
        assert (sorted_ids[row + pairs.numel():row + padded] == num_pairs).all()
        assert (expert_ids[row // block_m:(row + padded) // block_m] == e).all()
        row += padded
    assert int(post_pad) == row
    assert (sorted_ids[row:] == num_pairs).all()
    assert (expert_ids[row // block_m:] == -1).all()
    assert sorted_ids.numel() == ma.max_padded_rows(num_pairs, e_local, block_m) >= row


@pytest.mark.parametrize(("dtype", "n", "d", "f", "e_local", "expert_start", "config", "tol"), [
    (torch.float32, 1, 32, 48, 8, 0, None, 1e-5),  # F not a multiple of the column tile
    (torch.float32, 9, 48, 32, 8, 0, None, 1e-5),  # D not a multiple of the reduction tile
    (torch.float16, 5, 64, 64, 8, 0, None, 3e-3),  # the tuned-default fp16 tiles (16 x 64 x 128)
    (torch.float16, 40, 64, 96, 8, 0, FP16_SMALL, 3e-3),
    (torch.float32, 23, 32, 32, 4, 2, None, 1e-5),  # expert parallel: experts 2..5 local, the rest add nothing
    (torch.float16, 70, 32, 64, 8, 0, mc.MoEConfig(32, mc.GemmConfig(64, 32), mc.GemmConfig(32, 64)), 3e-3),
    # split-K w2: F = 80 over 3 splits of 32 (the last one partial) and 2 splits of 64 (one tile short)
    (torch.float32, 6, 32, 80, 8, 0, mc.MoEConfig(16, mc.GemmConfig(32, 32), mc.GemmConfig(32, 32, split_k=3)), 1e-5),
    (torch.float16, 4, 32, 96, 4, 4, mc.MoEConfig(16, mc.GemmConfig(32, 32), mc.GemmConfig(16, 64, split_k=2)), 3e-3),
])
def test_fused_moe_matches_reference(dtype: torch.dtype, n: int, d: int, f: int, e_local: int, expert_start: int,
                                     config: mc.MoEConfig | None, tol: float) -> None:
    gen = torch.Generator().manual_seed(n * 1000 + d)
    x = torch.randn(n, d, generator=gen).to(dtype)
    w13, w2 = _weights(e_local, f, d, dtype, gen)
    weights, ids = _routing(n, 8, 2, gen)
    out = fm.fused_moe(x, w13, w2, weights, ids, expert_start, config=config)
    ref = moe_reference(x.double(), w13.double(), w2.double(), weights.double(), ids, expert_start)
    assert out.dtype == dtype and out.shape == (n, d)
    assert torch.isfinite(out).all()
    assert _rel_err(out, ref) < tol


def test_small_batch_reads_only_selected_experts() -> None:
    """Batch 1: the unselected experts' weights are NaN; any read of them would poison the output."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, 32, generator=gen)
    w13, w2 = _weights(8, 32, 32, torch.float32, gen)
    ids = torch.tensor([[5, 2]])
    weights = torch.tensor([[0.7, 0.3]])
    ref = moe_reference(x, w13, w2, weights, ids)
    unused = [e for e in range(8) if e not in (2, 5)]
    w13[unused] = float("nan")
    w2[unused] = float("nan")
    out = fm.fused_moe(x, w13, w2, weights, ids)
    assert torch.isfinite(out).all()
    assert _rel_err(out, ref) < 1e-5


@pytest.mark.parametrize(("ids", "e_local", "expert_start", "split_k"), [
    ([[5, 2]], 8, 0, 1),  # batch 1: two experts, two pair blocks
    ([[5, 2], [2, 7]], 8, 0, 2),  # expert 2 shared: pair 1's block takes pairs 1 and 2, pair 2's exits
    ([[1, 1], [1, 3], [3, 1]], 8, 0, 1),  # top-k picks equal ids (not Mixtral, but the kernel must not care)
    ([[0, 6], [5, 4], [6, 0], [4, 5]], 4, 4, 3),  # expert parallel: only 4..7 local, split-K over 3
])
def test_direct_layout_matches_aligned_and_reference(ids: list[list[int]], e_local: int, expert_start: int,
                                                     split_k: int) -> None:
    """The align-free layout of decode batches gives the aligned layout's output (same tiles; rows sit at other
    positions of the block, which the interpreter's matmul may sum in another order) and reads only the local
    experts that were hit (the others are NaN)."""
    gen = torch.Generator().manual_seed(len(ids))
    topk_ids = torch.tensor(ids)
    n, k = topk_ids.shape
    x = torch.randn(n, 32, generator=gen)
    w13, w2 = _weights(e_local, 48, 32, torch.float32, gen)
    weights = torch.rand(n, k, generator=gen)
    hit = {e - expert_start for e in topk_ids.flatten().tolist() if 0 <= e - expert_start < e_local}
    ref = moe_reference(x.double(), w13.double(), w2.double(), weights.double(), topk_ids, expert_start)
    for e in set(range(e_local)) - hit:
        w13[e] = float("nan")
        w2[e] = float("nan")
    cfg = mc.MoEConfig(16, mc.GemmConfig(32, 32), mc.GemmConfig(32, 16, split_k=split_k))
    assert fm.layout_pairs(topk_ids, e_local, 16, expert_start).direct == (n * k <= e_local)
    direct = fm.fused_moe(x, w13, w2, weights, topk_ids, expert_start, config=cfg, direct=True)
    aligned = fm.fused_moe(x, w13, w2, weights, topk_ids, expert_start, config=cfg, direct=False)
    assert torch.isfinite(direct).all()
    torch.testing.assert_close(direct, aligned, rtol=1e-6, atol=1e-7)
    assert _rel_err(direct, ref) < 1e-5


def test_direct_layout_limits() -> None:
    ids = torch.zeros(5, 2, dtype=torch.int64)
    assert fm.direct_fits(8, 8, 16) and not fm.direct_fits(10, 8, 16) and not fm.direct_fits(8, 8, 4)
    assert not fm.direct_fits(0, 8, 16)
    assert not fm.layout_pairs(ids, 8, 16).direct  # 10 pairs > 8 experts: the align layout
    with pytest.raises(ValueError, match="block_m=8"):
        fm.layout_pairs(ids, 8, 8, direct=True)


def test_fused_moe_rejects_bad_shapes() -> None:
    x = torch.randn(3, 32)
    w13, w2 = _weights(8, 16, 32, torch.float32, torch.Generator().manual_seed(0))
    weights, ids = _routing(3, 8, 2, torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="w2"):
        fm.fused_moe(x, w13, w2.transpose(1, 2), weights, ids)
    with pytest.raises(ValueError, match="topk_ids"):
        fm.fused_moe(x, w13, w2, weights, ids[:2])


def test_triton_path_in_moe_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The triton backend inside a MoE layer (the interpreted kernels on CPU tensors: router and experts) equals
    the auto backend's CPU path, and takes the decode kernel."""
    calls: list[int] = []
    real = fm.fused_moe
    monkeypatch.setattr(fm, "fused_moe", lambda x, *a, **kw: calls.append(x.shape[0]) or real(x, *a, **kw))
    args = preset("tiny-odd")  # 6 experts, D 48, F 72: odd sizes
    gen = torch.Generator().manual_seed(3)
    layer = MoE(args, layer_idx=0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    x = torch.randn(11, args.dim, generator=gen)
    layer.kernels = Kernels(KernelConfig())
    with torch.inference_mode():  # the Triton kernels have no backward: under autograd the PyTorch path runs
        ref, _ = layer(x)
        assert calls == []
        layer.kernels = Kernels(KernelConfig(backend="triton"))
        out, _ = layer(x)
    assert calls == [11]
    layer(x)  # autograd recording: the grouped path
    assert calls == [11]
    assert _rel_err(out, ref) < 1e-5


def test_config_lookup_nearest_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mc, "CONFIG_DIR", tmp_path)
    table = {"1": FP16_SMALL.to_dict(),
             "64": mc.MoEConfig(32, mc.GemmConfig(64, 64, 4, 3), mc.GemmConfig(128, 64, 8, 4)).to_dict()}
    path = mc.config_path(8, 128, 64, "cpu")
    path.write_text(json.dumps({"configs": table}))
    mc.clear_config_cache()
    try:
        get = lambda n, dt=torch.float16: mc.get_config(8, 128, 64, n, dt, torch.device("cpu"))  # noqa: E731
        assert get(1) == FP16_SMALL and get(20) == FP16_SMALL
        assert get(40).block_m == 32 and get(4096).w2 == mc.GemmConfig(128, 64, 8, 4)
        assert get(1, torch.float32) == mc.default_config(1, torch.float32)  # 4-byte dtypes: never the file
        assert mc.get_config(8, 256, 64, 1, torch.float16, torch.device("cpu")) == mc.default_config(1, torch.float16)
        path.rename(mc.config_path(8, 128, 64, "Other GPU"))  # no file for this device: borrow the shape's
        mc.clear_config_cache()
        assert get(1) == FP16_SMALL
    finally:
        mc.clear_config_cache()


def test_committed_configs_are_valid() -> None:
    """Every tuned file parses, and its tiles are powers of two the kernels accept; the decode kernel's
    tables start at batch 1, the prefill path's (``sorted_``) at its dispatch threshold or below."""
    files = sorted(mc.CONFIG_DIR.glob("*.json"))
    assert files, f"no tuned configs under {mc.CONFIG_DIR}"
    for path in files:
        table = mc.load_configs(path)
        first = dispatch.SORTED_MIN_TOKENS if path.name.startswith("sorted_") else 1
        assert table and min(table) <= first, path.name
        for cfg in table.values():
            sizes = [cfg.block_m, cfg.w13.block_n, cfg.w13.block_k, cfg.w2.block_n, cfg.w2.block_k]
            assert all(s >= 16 and s & (s - 1) == 0 for s in sizes), (path.name, cfg)


@pytest.mark.parametrize("splits", [1, 3])
def test_moe_sum_skips_other_ranks_rows(splits: int) -> None:
    """The epilogue sums each token's local pairs over the split-K slices in fp32 and never reads the rows of
    another rank's pairs (left unwritten: NaN here)."""
    gen = torch.Generator().manual_seed(3)
    n, k, d, start, local = 5, 2, 40, 2, 3
    ids = torch.randint(0, 8, (n, k), generator=gen)
    partials = torch.randn(splits, n * k, d, generator=gen)
    is_local = ((ids >= start) & (ids < start + local)).reshape(-1)  # [N*k]
    partials[:, ~is_local] = float("nan")
    out = msum.moe_sum(partials, ids, start, local, torch.float16)
    want = torch.where(is_local[None, :, None], partials, 0.0).sum(0).view(n, k, d).sum(1)
    assert is_local.any() and (~is_local).any()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), want, rtol=1e-3, atol=1e-3)
