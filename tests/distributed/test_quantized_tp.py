"""Quantized weights under tensor parallelism (gloo on CPU): each rank quantizes (or repacks) whole pieces and
keeps its part through ``StoredTensor.rows`` / ``cols``, so TP 2 holds the one-process model's tensors, cut.

Weight-only int schemes compute the same products, only summed over ranks: logits equal to fp32 rounding. FP8
quantizes activations per token, and a row-parallel rank (wo, w2) sees only its half of each activation row,
so its scale is the half's: close, not equal (vLLM's behaviour too). A GPTQ act-order checkpoint, whose stored
column permutation cannot be cut by input columns, is refused clearly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "checkpoint"))  # the quantized-checkpoint writers live there
from quant_ckpt_testing import ARGS as QARGS
from quant_ckpt_testing import write_quantized

from mixtral.checkpoint.errors import CheckpointError
from mixtral.checkpoint.loader import load_model, resolve
from mixtral.checkpoint.writer import save_checkpoint
from mixtral.distributed.config import ParallelConfig
from mixtral.distributed.sharded_loader import load_shard
from mixtral.model.args import ModelArgs
from mixtral.model.mixtral import Transformer, init_random_weights
from mixtral.model.quantized import quant_weights

# A TP-2 rank's input widths (q_size / 2 = hidden / 2 = 128) take int4 groups of 128, as one process does.
ARGS = ModelArgs(dim=128, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=32, hidden_dim=256, vocab_size=512,
                 num_experts=4, num_experts_per_tok=2, max_seq_len=256)
IDS = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(6))
DRIVER = Path(__file__).with_name("quant_tp_driver.py")


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = Transformer(ARGS)
    init_random_weights(model, seed=1, std=0.08)
    return save_checkpoint(model, ARGS, tmp_path_factory.mktemp("tpq"), "hf", dtype=torch.bfloat16)


def _tp2(name: str, quantization: str | None, tmp_path: Path) -> dict:
    """A TP 2 group's logits over IDS and rank 0's quantized shapes, from a driver process (quant_tp_driver.py):
    one group per process, and the session-wide groups of conftest.py may be running in this one."""
    ids, out = tmp_path / "ids.pt", tmp_path / "out.pt"
    torch.save(IDS % 256, ids)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(DRIVER), name, quantization or "none", str(ids), str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("scheme", ["int4", "int8", "fp8"])
def test_tp2_from_bf16_equals_one_process(scheme: str, bf16_folder: Path, tmp_path: Path) -> None:
    full = load_model(str(bf16_folder), "cpu", torch.float32, quantization=scheme)
    with torch.inference_mode():
        want = full(IDS % 256)
    res = _tp2(str(bf16_folder), scheme, tmp_path)
    got, rank0 = res["logits"], res["rank0"]
    assert rank0["layers.0.feed_forward.w2"]["in_features"] == ARGS.hidden_dim // 2  # a shard, quantized
    if scheme == "int4":
        assert rank0["layers.0.attention.wo"]["group"] == 128
    if scheme == "fp8":  # per-rank activation scales on wo / w2 (module docstring): FP8's own noise, no more
        assert ((got - want).norm() / want.norm()).item() < 0.2
    else:
        assert (got - want).abs().max().item() < 1e-4


def test_tp2_from_a_quantized_checkpoint_equals_one_process(tmp_path: Path) -> None:
    write_quantized(tmp_path / "awq", "awq-g64", args=QARGS)
    full = load_model(str(tmp_path / "awq"), "cpu", torch.float32)
    with torch.inference_mode():
        want = full(IDS % 256)
    got = _tp2(str(tmp_path / "awq"), None, tmp_path)["logits"]
    assert (got - want).abs().max().item() < 1e-4


def test_rank_shards_are_the_one_process_tensors_cut(bf16_folder: Path) -> None:
    """Without processes: each rank's stored tensors are the TP-1 model's rows / columns."""
    full = dict(quant_weights(load_model(str(bf16_folder), "cpu", torch.float32, quantization="int4")))
    source = resolve(str(bf16_folder))
    for rank in (0, 1):
        shard = dict(quant_weights(load_shard(source, ParallelConfig(tensor_parallel_size=2), rank, "cpu",
                                              torch.float32, quantization="int4").model))
        w2, w2_full = shard["layers.1.feed_forward.w2"], full["layers.1.feed_forward.w2"]
        for s in w2.method.stored():
            cut = s.cols(w2_full.tensors[s.name], rank * 128, (rank + 1) * 128)
            assert torch.equal(w2.tensors[s.name], cut), s.name
        # expert parallelism: the rank holds whole experts, its range of the stacked [E, ...] tensors
        ep = dict(quant_weights(load_shard(source, ParallelConfig(tensor_parallel_size=2, enable_expert_parallel=True),
                                           rank, "cpu", torch.float32, quantization="int4").model))
        half = ARGS.num_experts // 2
        for name in ("layers.0.feed_forward.w13", "layers.1.feed_forward.w2"):
            for key, t in ep[name].tensors.items():
                assert torch.equal(t, full[name].tensors[key][rank * half:(rank + 1) * half]), (name, key)


def test_act_order_row_parallel_is_refused(tmp_path: Path) -> None:
    write_quantized(tmp_path / "g", "gptq-4bit-act-order-g32", args=QARGS)
    with pytest.raises(CheckpointError, match=r"act-order weights .* cannot be split by input columns"):
        load_shard(resolve(str(tmp_path / "g")), ParallelConfig(tensor_parallel_size=2), 0, "cpu", torch.float32)
