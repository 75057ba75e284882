"""Every way a checkpoint can be broken fails with a CheckpointError naming the tensor and the file,
before any weight is loaded (never a half-loaded model). Pickle files need an explicit opt-in."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mixtral.checkpoint import loader
from mixtral.checkpoint.errors import CheckpointError
from mixtral.checkpoint.loader import load_model
from mixtral.checkpoint.writer import save_checkpoint
from mixtral.model.args import ModelArgs
from mixtral.model.config_formats import args_to_hf_config
from mixtral.model.mixtral import Transformer, init_random_weights

MICRO = ModelArgs(dim=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, hidden_dim=24, vocab_size=64,
                  num_experts=3, num_experts_per_tok=2, max_seq_len=64)


def _model() -> Transformer:
    model = Transformer(MICRO).eval()
    init_random_weights(model, seed=0, std=0.1)
    return model


@pytest.fixture
def hf_dir(tmp_path: Path) -> Path:
    return save_checkpoint(_model(), MICRO, tmp_path / "hf", "hf")


@pytest.fixture
def sharded_dir(tmp_path: Path) -> Path:
    folder = save_checkpoint(_model(), MICRO, tmp_path / "sharded", "hf", max_shard_bytes=8_000)
    assert len(list(folder.glob("model-*.safetensors"))) > 2
    return folder


@pytest.fixture
def no_allocation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the loader allocates the model: validation must come first."""
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was allocated before the checkpoint was validated")

    monkeypatch.setattr(loader, "empty_model", forbidden)


def _edit(path: Path, edit) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _fails(folder: Path, *needles: str) -> str:
    with pytest.raises(CheckpointError) as info:
        load_model(folder)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in: {message}"
    return message


def test_good_checkpoint_loads(hf_dir: Path) -> None:
    assert torch.equal(load_model(hf_dir).output.weight, _model().output.weight)


@pytest.mark.usefixtures("no_allocation")
def test_missing_tensor(hf_dir: Path) -> None:
    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    _edit(hf_dir / "model.safetensors", lambda t: t.pop(name))
    _fails(hf_dir, name, "missing", "model.safetensors")


@pytest.mark.usefixtures("no_allocation")
def test_unexpected_tensor(hf_dir: Path) -> None:
    name = "model.layers.0.block_sparse_moe.experts.3.w1.weight"  # a 4th expert the config does not have
    _edit(hf_dir / "model.safetensors", lambda t: t.__setitem__(name, torch.zeros(24, 16)))
    _fails(hf_dir, name, "unexpected", str(hf_dir / "model.safetensors"))


def test_rotary_inv_freq_buffers_are_ignored(hf_dir: Path) -> None:
    name = "model.layers.0.self_attn.rotary_emb.inv_freq"  # saved by some old exports; recomputed here
    _edit(hf_dir / "model.safetensors", lambda t: t.__setitem__(name, torch.ones(4)))
    load_model(hf_dir)


@pytest.mark.usefixtures("no_allocation")
def test_wrong_shape(hf_dir: Path) -> None:
    name = "model.layers.0.self_attn.k_proj.weight"
    _edit(hf_dir / "model.safetensors", lambda t: t.__setitem__(name, torch.zeros(16, 16)))
    _fails(hf_dir, name, str(hf_dir / "model.safetensors"), "[16, 16]", "[8, 16]")


@pytest.mark.usefixtures("no_allocation")
def test_wrong_config_for_the_weights(hf_dir: Path) -> None:
    config = json.loads((hf_dir / "config.json").read_text())
    config["intermediate_size"] = 32
    (hf_dir / "config.json").write_text(json.dumps(config))
    _fails(hf_dir, "model.layers.0.block_sparse_moe.experts.0.w1.weight", "[24, 16]", "[32, 16]")


@pytest.mark.usefixtures("no_allocation")
def test_truncated_file(hf_dir: Path) -> None:
    path = hf_dir / "model.safetensors"
    os.truncate(path, path.stat().st_size - 100)  # an interrupted download
    message = _fails(hf_dir, str(path), "truncated")
    assert "tensor '" in message  # names the first tensor whose bytes are missing


@pytest.mark.usefixtures("no_allocation")
def test_truncated_header(hf_dir: Path) -> None:
    path = hf_dir / "model.safetensors"
    os.truncate(path, 5)
    _fails(hf_dir, str(path), "truncated")


@pytest.mark.usefixtures("no_allocation")
def test_index_points_to_missing_shard(sharded_dir: Path) -> None:
    index = json.loads((sharded_dir / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (sharded_dir / shard).unlink()
    tensor = next(n for n, s in index["weight_map"].items() if s == shard)
    _fails(sharded_dir, shard, "model.safetensors.index.json", tensor, "missing")


@pytest.mark.usefixtures("no_allocation")
def test_index_names_the_wrong_shard(sharded_dir: Path) -> None:
    path = sharded_dir / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(n for n, s in index["weight_map"].items() if s == shards[0])
    index["weight_map"][name] = shards[1]
    path.write_text(json.dumps(index))
    _fails(sharded_dir, name, shards[0], shards[1])


@pytest.mark.usefixtures("no_allocation")
def test_index_that_is_not_an_index(sharded_dir: Path) -> None:
    (sharded_dir / "model.safetensors.index.json").write_text('{"metadata": {}}')
    _fails(sharded_dir, "weight_map", "model.safetensors.index.json")


@pytest.mark.usefixtures("no_allocation")
def test_consolidated_missing_wq(tmp_path: Path) -> None:
    folder = save_checkpoint(_model(), MICRO, tmp_path / "mistral", "mistral")
    name = "layers.1.attention.wq.weight"
    _edit(folder / "consolidated.safetensors", lambda t: t.pop(name))
    _fails(folder, name, "consolidated.safetensors")


def test_folder_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(args_to_hf_config(MICRO)))
    _fails(tmp_path, "no weight files", str(tmp_path))


def test_folder_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    _fails(tmp_path, "neither config.json", "notes.txt")


def test_unknown_name() -> None:
    with pytest.raises(CheckpointError, match="not a model folder, a preset"):
        load_model("no such model")


# --------------------------------------------------------------------------- pickle
def _pickle_hf(folder: Path) -> None:
    """Replace model.safetensors by the same tensors in pytorch_model.bin (a pickle)."""
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(tensors, folder / "pytorch_model.bin")


def test_pickle_refused_by_default(hf_dir: Path) -> None:
    _pickle_hf(hf_dir)
    _fails(hf_dir, "pytorch_model.bin", "pickle", "allow_pickle=True")


def test_pickle_loaded_with_opt_in(hf_dir: Path) -> None:
    want = load_model(hf_dir).state_dict()
    _pickle_hf(hf_dir)
    got = load_model(hf_dir, allow_pickle=True).state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_consolidated_pth_refused_then_loaded_with_opt_in(tmp_path: Path) -> None:
    folder = save_checkpoint(_model(), MICRO, tmp_path / "mistral", "mistral")
    want = load_model(folder).state_dict()
    torch.save(load_file(folder / "consolidated.safetensors"), folder / "consolidated.00.pth")
    (folder / "consolidated.safetensors").unlink()
    _fails(folder, "consolidated.00.pth", "pickle")
    got = load_model(folder, allow_pickle=True).state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_pickle_that_is_not_a_state_dict(hf_dir: Path) -> None:
    (hf_dir / "model.safetensors").unlink()
    torch.save([torch.zeros(2)], hf_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin"):
        load_model(hf_dir, allow_pickle=True)


@pytest.mark.usefixtures("no_allocation")
def test_tensor_in_two_shards(tmp_path: Path) -> None:
    folder = save_checkpoint(_model(), MICRO, tmp_path / "mistral", "mistral")
    name = "layers.0.attention.wv.weight"
    save_file({name: load_file(folder / "consolidated.safetensors")[name]}, folder / "consolidated.01.safetensors")
    _fails(folder, name, "consolidated.safetensors", "consolidated.01.safetensors")
