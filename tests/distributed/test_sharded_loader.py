"""Sharded loading without processes: each rank's shard, loaded from either checkpoint format, is exactly its
slice of the single-process model, read with exactly its own bytes; quantized stored tensors slice by the same
rules (quant/base.py's StoredTensor); random presets agree across layouts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mixtral.checkpoint.hf import hf_specs
from mixtral.checkpoint.loader import load_model, resolve
from mixtral.checkpoint.safetensors_io import LazySlice
from mixtral.distributed.config import ParallelConfig
from mixtral.distributed.sharded_loader import (
    empty_shard,
    init_random_pieces,
    load_shard,
    piece_part,
    shard_parameters,
)
from mixtral.model.args import ModelArgs
from mixtral.model.mixtral import Transformer
from mixtral.model.presets import PRESETS
from mixtral.quant.base import StoredTensor

LAYOUTS = [ParallelConfig(2), ParallelConfig(2, True), ParallelConfig(4, expert_parallel_size=2), ParallelConfig(4)]


def assert_shard_is_slice(full: Transformer, shard: Transformer, args: ModelArgs, config: ParallelConfig,
                          rank: int) -> None:
    """Every piece of ``shard`` equals the rank's part of the same piece of ``full`` (internal layouts)."""
    layout = config.layout(args, rank)
    full_params = dict(full.named_parameters())
    shard_params = dict(shard.named_parameters())
    for spec in hf_specs(args):
        part = piece_part(spec, args, layout)
        if part is None:
            continue
        want = part.select(spec.select(full_params[spec.param]))
        got = part.local.select(shard_params[spec.param])
        assert torch.equal(got, want), f"rank {rank}: {spec.name}"


@pytest.mark.parametrize("config", LAYOUTS, ids=lambda c: c.describe())
@pytest.mark.parametrize("fmt", ["hf", "mistral"])
def test_shards_are_slices_of_the_full_model(config: ParallelConfig, fmt: str, tiny_hf_checkpoint: Path,
                                             tiny_consolidated_checkpoint: Path) -> None:
    folder = tiny_hf_checkpoint if fmt == "hf" else tiny_consolidated_checkpoint
    full = load_model(str(folder))
    source = resolve(str(folder))
    full_bytes = sum(p.numel() * 4 for p in full.parameters())
    total = 0
    for rank in range(config.world_size):
        loaded = load_shard(source, config, rank, "cpu", torch.float32)
        assert_shard_is_slice(full, loaded.model, source.args, config, rank)
        mine = sum(p.numel() * 4 for p in loaded.model.parameters())
        assert loaded.bytes_read == mine  # the rank read its own slices and nothing else
        assert mine == shard_parameters(source.args, config, rank) * 4
        total += mine
        if rank == 0:
            layer = loaded.model.layers[0].feed_forward
            assert layer.expert_start == 0
        else:
            assert loaded.model.layers[0].feed_forward.expert_start == config.layout(source.args, rank).experts[0]
    assert total < full_bytes * config.world_size  # not replicated everywhere


def test_the_single_rank_layout_is_the_whole_model(tiny_hf_checkpoint: Path) -> None:
    full = load_model(str(tiny_hf_checkpoint))
    loaded = load_shard(resolve(str(tiny_hf_checkpoint)), ParallelConfig(1), 0, "cpu", torch.float32)
    for (name, a), (_, b) in zip(full.named_parameters(), loaded.model.named_parameters(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("config", LAYOUTS, ids=lambda c: c.describe())
def test_random_presets_agree_across_layouts(config: ParallelConfig) -> None:
    args = PRESETS["tiny"]
    whole = empty_shard(args, ParallelConfig(1).layout(args, 0), "cpu", torch.float32)
    init_random_pieces(whole, args, ParallelConfig(1).layout(args, 0), seed=3)
    for rank in range(config.world_size):
        shard = load_shard(resolve("tiny"), config, rank, "cpu", torch.float32, seed=3).model
        assert_shard_is_slice(whole, shard, args, config, rank)


def test_lazy_slice_reads_the_narrowed_ranges() -> None:
    t = torch.arange(60.0).reshape(5, 12)
    lazy = LazySlice(t, tuple(t.shape))  # a tensor indexes like safetensors' slice
    got = lazy.narrow(0, 1, 3).narrow(1, 4, 6)
    assert got.shape == (3, 6) and torch.equal(got.load(), t[1:4, 4:10])
    with pytest.raises(IndexError, match=r"narrow\(1, 4, 9\) is outside a dimension of size 12"):
        lazy.narrow(1, 4, 9)


def test_quantized_stored_tensors_slice_by_the_same_rule() -> None:
    """An int4 w2 [D, F] kept as codes [D, F/2] (two a byte) and group scales [D, F/32]: the rank's column part
    of a lazy slice of each stored tensor is the stored tensor of the rank's logical columns."""
    args = PRESETS["tiny"]  # D = 64, F = 128
    spec = next(s for s in hf_specs(args) if s.name.endswith("layers.0.block_sparse_moe.experts.5.w2.weight"))
    layout = ParallelConfig(2).layout(args, 1)  # F columns [64, 128)
    part = piece_part(spec, args, layout)
    assert part is not None and part.cols == (64, 128)
    codes = StoredTensor("codes", torch.uint8, out_block=1, in_block=2)
    scales = StoredTensor("scales", torch.float32, out_block=1, in_block=32)
    per_tensor = StoredTensor("global_scale", torch.float32, out_block=0, in_block=0)
    c = torch.arange(64 * 64).reshape(64, 64)
    s = torch.arange(64 * 4).reshape(64, 4)
    assert torch.equal(part.select(LazySlice(c, tuple(c.shape)), codes).load(), c[:, 32:64])
    assert torch.equal(part.select(LazySlice(s, tuple(s.shape)), scales).load(), s[:, 2:4])
    g = torch.tensor([7.0])
    assert part.select(g, per_tensor) is g  # replicated, never sliced


def test_shard_parameters_of_8x7b() -> None:
    """TP 2 of Mixtral-8x7B: each GPU holds half of everything but the replicated embeddings, lm_head, norms
    and routers (about 23.5B of 46.7B parameters)."""
    args = PRESETS["mixtral-8x7b"]
    counts = args.num_parameters()
    replicated = counts["embeddings"] + counts["router"] + (2 * args.n_layers + 1) * args.dim
    for config in (ParallelConfig(2), ParallelConfig(2, True)):
        assert shard_parameters(args, config) == (counts["total"] - replicated) // 2 + replicated
