"""Both checkpoint formats hold the same model: specs, RoPE permutation, conversion, sharding, dtypes, init."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import mixtral
from mixtral.checkpoint.consolidated import consolidated_specs
from mixtral.checkpoint.hf import hf_specs
from mixtral.checkpoint.loader import load_model, parse_dtype
from mixtral.checkpoint.tokenizer_files import packaged_tokenizer
from mixtral.checkpoint.writer import RandomSource, convert_checkpoint, save_checkpoint, write_checkpoint
from mixtral.kernels.reference import rope_reference
from mixtral.model.layers import rope_cos_sin
from mixtral.model.mixtral import Transformer, init_random_weights
from mixtral.model.presets import preset


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (safe_open is not a dict)
    return out


def test_public_export() -> None:
    assert mixtral.load_model is load_model


@pytest.mark.parametrize("name", ["tiny", "tiny-odd"])
@pytest.mark.parametrize("specs_fn", [hf_specs, consolidated_specs])
def test_specs_cover_every_parameter_exactly_once(name: str, specs_fn) -> None:
    args = preset(name)
    with torch.device("meta"):
        params = dict(Transformer(args).named_parameters())
    hits = {n: torch.zeros(p.shape, dtype=torch.int8) for n, p in params.items()}
    for spec in specs_fn(args):
        piece = spec.select(hits[spec.param])
        assert tuple(piece.shape) == spec.shape, spec.name
        piece += 1
    for n, h in hits.items():
        assert bool((h == 1).all()), f"{n}: some elements covered {int(h.min())}..{int(h.max())} times"
    # Specs are in parameter order (RandomSource and the streaming writers rely on it).
    order = list(params)
    positions = [order.index(s.param) for s in specs_fn(args)]
    assert positions == sorted(positions)


def test_hf_and_consolidated_give_identical_logits(tiny_hf_checkpoint: Path,
                                                   tiny_consolidated_checkpoint: Path) -> None:
    assert (tiny_consolidated_checkpoint / "params.json").is_file()
    a, b = load_model(tiny_hf_checkpoint), load_model(tiny_consolidated_checkpoint)
    ids = torch.randint(0, a.args.vocab_size, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))
    assert a.args == b.args


def test_consolidated_wq_wk_are_interleaved_rope(tiny_hf_checkpoint: Path,
                                                 tiny_consolidated_checkpoint: Path) -> None:
    """Mistral's RoPE on the consolidated wq/wk gives the attention scores our rotate_half layout gives."""
    args = preset("tiny")
    hd, n = args.head_dim, 9
    raw = _tensors(tiny_consolidated_checkpoint)
    wq, wk = raw["layers.1.attention.wq.weight"], raw["layers.1.attention.wk.weight"]  # [H*hd, D], [KV*hd, D]
    x = torch.randn(n, args.dim, generator=torch.Generator().manual_seed(4))  # [N, D]
    pos = torch.arange(n)

    def mistral_rope(w: torch.Tensor, heads: int) -> torch.Tensor:  # interleaved pairs, as complex numbers
        inv_freq = 1.0 / args.rope_theta ** (torch.arange(0, hd, 2).float() / hd)  # [hd/2]
        cis = torch.polar(torch.ones(n, hd // 2), pos[:, None].float() * inv_freq)  # [N, hd/2]
        y = torch.view_as_complex((x @ w.T).view(n, heads, hd // 2, 2).contiguous())  # [N, heads, hd/2]
        return torch.view_as_real(y * cis[:, None]).flatten(2)  # [N, heads, hd]

    def ours(wq_: torch.Tensor, wk_: torch.Tensor) -> torch.Tensor:
        cos, sin = rope_cos_sin(pos, hd, args.rope_theta, torch.float32)
        q = rope_reference((x @ wq_.T).view(n, args.n_heads, hd), cos, sin)
        k = rope_reference((x @ wk_.T).view(n, args.n_kv_heads, hd), cos, sin)
        return scores(q, k)

    def scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:  # [H, N, N]
        return torch.einsum("nhd,mhd->hnm", q, k.repeat_interleave(args.n_rep, dim=1))

    want = scores(mistral_rope(wq, args.n_heads), mistral_rope(wk, args.n_kv_heads))
    model = load_model(tiny_consolidated_checkpoint)
    wqkv = model.layers[1].attention.wqkv.weight.detach()
    got = ours(wqkv[: args.q_size], wqkv[args.q_size: args.q_size + args.kv_size])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # Without the permutation the scores differ: the test can tell.
    assert (ours(wq, wk) - want).abs().max() > 1e-2


def test_convert_round_trip_is_bit_exact(tiny_hf_checkpoint: Path, tiny_consolidated_checkpoint: Path,
                                         tmp_path: Path) -> None:
    back = convert_checkpoint(tiny_consolidated_checkpoint, tmp_path / "hf", "hf")
    original, again = _tensors(tiny_hf_checkpoint), _tensors(back)
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) for k in original)
    config = (back / "config.json").read_text()
    assert json.loads(config) == json.loads((tiny_hf_checkpoint / "config.json").read_text())
    assert (back / "tokenizer.model.v3").read_bytes() == packaged_tokenizer("v3").read_bytes()


def test_sharded_hf_checkpoint_with_index(tmp_path: Path) -> None:
    args = preset("tiny-odd")
    model = Transformer(args).eval()
    init_random_weights(model, seed=2)
    folder = save_checkpoint(model, args, tmp_path, "hf", max_shard_bytes=1_000_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) == len(set(index["weight_map"].values())) > 2
    assert not (folder / "model.safetensors").exists()
    assert set(index["weight_map"]) == {s.name for s in hf_specs(args)}
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            assert {k for k, v in index["weight_map"].items() if v == shard.name} == set(f.keys())
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in _tensors(folder).values())
    loaded = load_model(folder)
    for (name, p), (name2, q) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert name == name2 and torch.equal(p, q), name


def test_bf16_checkpoint_loads_as_rounded_weights(tiny_hf_checkpoint: Path, tmp_path: Path) -> None:
    folder = convert_checkpoint(tiny_hf_checkpoint, tmp_path / "bf16", "mistral", torch.bfloat16)
    assert {t.dtype for t in _tensors(folder).values()} == {torch.bfloat16}
    fp32 = load_model(tiny_hf_checkpoint).state_dict()
    from_bf16 = load_model(folder, dtype="fp32").state_dict()
    assert all(torch.equal(fp32[k].bfloat16().float(), from_bf16[k]) for k in fp32)
    model = load_model(folder, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and not model.training


def test_init_writes_the_presets_random_weights(tmp_path: Path) -> None:
    args = preset("tiny-odd")
    folder = write_checkpoint(RandomSource(args, seed=5, std=0.02), args, tmp_path, "mistral", torch.float32)
    from_disk = load_model(folder).state_dict()
    in_memory = load_model("tiny-odd", seed=5).state_dict()
    assert all(torch.equal(from_disk[k], in_memory[k]) for k in in_memory)
    other_seed = load_model("tiny-odd", seed=6).state_dict()
    assert not torch.equal(other_seed["output.weight"], in_memory["output.weight"])


def test_save_state_dict_and_tokenizer_choice(tmp_path: Path) -> None:
    args = preset("tiny-v1")
    model = Transformer(args)
    init_random_weights(model, seed=1)
    folder = save_checkpoint(model.state_dict(), args, tmp_path, "hf", dtype=torch.float16)
    assert (folder / "tokenizer.model.v1").read_bytes() == packaged_tokenizer("v1").read_bytes()
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "float16"
    assert load_model(folder, dtype="fp16").args.tokenizer == "v1"


@pytest.mark.parametrize(("text", "want"), [("fp32", torch.float32), ("bfloat16", torch.bfloat16),
                                            ("BF16", torch.bfloat16), ("float16", torch.float16),
                                            (torch.float16, torch.float16)])
def test_parse_dtype(text, want: torch.dtype) -> None:
    assert parse_dtype(text) is want


@pytest.mark.parametrize("bad", ["int8", "fp8", torch.int32])
def test_parse_dtype_rejects(bad) -> None:
    with pytest.raises(ValueError, match="dtype"):
        parse_dtype(bad)


def test_reader_closes_each_shard_after_its_last_tensor(tmp_path: Path) -> None:
    from mixtral.checkpoint.reader import CheckpointReader

    args = preset("tiny-odd")
    folder = write_checkpoint(RandomSource(args), args, tmp_path, "hf", max_shard_bytes=500_000)
    reader = CheckpointReader(folder, "hf", args)
    assert len(reader.files) > 3
    most_open = 0
    for spec in reader.specs:
        reader.read(spec)
        most_open = max(most_open, len(reader._safetensors.open_files()))
    assert most_open == 1  # shards are written in spec order, so one is mapped at a time
    assert reader._safetensors.open_files() == []
