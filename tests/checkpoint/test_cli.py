"""`mixtral init`, `convert` and `info` through the real command-line entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mixtral.checkpoint.loader import load_model
from mixtral.cli.main import main


def test_init_convert_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hf_dir, mistral_dir, back = tmp_path / "hf", tmp_path / "mistral", tmp_path / "back"
    assert main(["init", str(hf_dir), "--preset", "tiny-odd", "--format", "hf", "--seed", "7", "--dtype", "fp32",
                 "--max-shard-size", "1MB"]) == 0
    assert (hf_dir / "model.safetensors.index.json").is_file() and (hf_dir / "tokenizer.model.v3").is_file()
    want = load_model("tiny-odd", seed=7).state_dict()  # init writes exactly the preset's random weights
    got = load_model(hf_dir).state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)

    assert main(["convert", str(hf_dir), str(mistral_dir), "--to", "mistral", "--dtype", "bf16"]) == 0
    assert (mistral_dir / "params.json").is_file() and (mistral_dir / "consolidated.safetensors").is_file()
    assert main(["convert", str(mistral_dir), str(back), "--to", "hf"]) == 0
    from_bf16 = load_model(back).state_dict()
    assert all(torch.equal(want[k].bfloat16().float(), from_bf16[k]) for k in want)
    capsys.readouterr()

    assert main(["info", str(mistral_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "mistral" and info["config"]["num_experts"] == 6
    assert info["parameters"]["total"] == sum(t.numel() for t in want.values())
    assert info["weight_bytes"]["bf16"] == 2 * info["parameters"]["total"]
    assert info["checkpoint_bytes"] >= 2 * info["parameters"]["total"]
    assert info["checkpoint_files"] == 1 and info["checkpoint_dtypes"] == ["bfloat16"]


def test_info_on_full_size_preset(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "mixtral-8x7b"]) == 0
    out = capsys.readouterr().out
    assert "46.70B" in out and "12.88B" in out  # total and active parameters of Mixtral-8x7B
    assert "131,072 B (bf16)" in out  # KV bytes per token: 2 * 32 layers * 8 heads * 128 * 2 bytes


def test_init_with_unknown_preset_is_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["init", str(tmp_path), "--preset", "mixtral-9x9b"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["convert", "init", "info"])
def test_help_explains_every_flag(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    flags = {"convert": ["--to", "--dtype", "--max-shard-size", "--allow-pickle", "--progress"],
             "init": ["--preset", "--format", "--seed", "--std", "--dtype", "--max-shard-size"],
             "info": ["--json"]}[command]
    for flag in flags:
        assert flag in out


def test_errors_are_one_line_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "out"), "--to", "hf"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mixtral convert: error:") and "nowhere" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # a bad source fails before the output is touched
    assert main(["info", str(tmp_path)]) == 1
    assert "neither config.json" in capsys.readouterr().err


def test_existing_checkpoint_is_only_replaced_with_overwrite(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["init", str(out), "--preset", "tiny-odd", "--format", "hf", "--max-shard-size", "1MB"]) == 0
    (out / "notes.txt").write_text("mine")
    assert main(["init", str(out), "--preset", "tiny-odd", "--format", "mistral"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["init", str(out), "--preset", "tiny-odd", "--format", "mistral", "--overwrite"]) == 0
    names = {p.name for p in out.iterdir()}
    # The old HF files are gone (they would shadow the new checkpoint); unrelated files stay.
    assert names == {"params.json", "consolidated.safetensors", "tokenizer.model.v3", "notes.txt"}
    assert load_model(out).args.num_experts == 6
