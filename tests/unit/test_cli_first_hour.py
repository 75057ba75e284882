"""A new user's first hour with the command line: vLLM's serve flags, ``--version``, unknown flags reported by the
subcommand, a model that cannot fit refused before loading (both numbers and the ways out), ``--lora`` given a
training run's folder, CORS only when asked for, and error hints that name commands that exist."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from lora_testing import save_nonzero_adapter

from mixtral.checkpoint.loader import load_model
from mixtral.cli import serve
from mixtral.cli.main import build_parser, main
from mixtral.engine.loading import load_for_engine
from mixtral.engine.memory import InsufficientMemoryError, check_model_fits
from mixtral.model.presets import preset
from mixtral.serve.inprocess import free_port
from mixtral.train.lora import find_adapter, merge_lora_into

VLLM_FLAGS = ["--model", "tiny", "--device", "cpu", "--dtype", "float32", "--no-enable-prefix-caching",
              "--block-size", "32", "--disable-log-requests", "--uvicorn-log-level", "warning", "--tokenizer-mode",
              "mistral", "--enable-auto-tool-choice", "--tool-call-parser", "mistral", "--allowed-origins", '["*"]',
              "--max-model-len", "64", "--kv-cache-bytes", str(1 << 20)]


def test_vllm_serve_flags_take_effect() -> None:
    args = build_parser("serve").parse_args(["serve", *VLLM_FLAGS])
    assert serve._check(args) is None and serve.model_name(args) == "tiny"
    assert serve.allowed_origins(args.allowed_origins) == ["*"]
    engine = serve.load_engine(args)
    try:
        assert engine.config.block_size == 32 and engine.config.enable_prefix_caching is False
        assert engine.model.dtype == torch.float32
    finally:
        engine.shutdown()
    half = build_parser("serve").parse_args(["serve", "tiny", "--dtype", "half", "--enable-prefix-caching"])
    assert half.dtype == "half" and half.enable_prefix_caching is True
    from mixtral.checkpoint.loader import parse_dtype

    assert parse_dtype(half.dtype) == torch.float16
    clash = build_parser("serve").parse_args(["serve", "demo", "--model", "tiny"])
    assert "disagree" in (serve._check(clash) or "")
    assert serve.allowed_origins("http://a.example, http://b.example") == ["http://a.example", "http://b.example"]
    with pytest.raises(ValueError, match="allowed-origins"):
        serve.allowed_origins("[1, 2]")


def test_tokenizer_flag(tiny_hf_checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copy(tiny_hf_checkpoint / "tokenizer.model.v3", folder / "tokenizer.model.v3")
    tok = serve.load_tokenizer(folder)
    assert tok.version == "v3" and tok.vocab_size == 32768
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        serve.load_tokenizer(tmp_path)


def test_version_and_unknown_flags(capsys: Any) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("mixtral 0.")
    with pytest.raises(SystemExit) as info:
        main(["serve", "--unknown"])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert "usage: mixtral serve" in err and "mixtral serve: error: unrecognized arguments: --unknown" in err


def test_a_model_that_cannot_fit_fails_before_loading() -> None:
    def small(device: torch.device) -> tuple[int, str]:
        return 10 * 2**20, f"test memory of {device}"

    with pytest.raises(InsufficientMemoryError) as info:
        load_for_engine("tiny", "cpu", "float32", memory_probe=small)
    message = str(info.value)
    need = preset("tiny").num_parameters()["total"] * 4 / 2**30
    assert f"{need:.1f} GiB" in message and "test memory of cpu is 0.0 GiB" in message
    for way_out in ("--quantization", "--tensor-parallel-size", "--max-model-len"):
        assert way_out in message
    # The KV part follows --max-model-len: shorter sequences can make a model fit.
    args = preset("tiny")
    weights = args.num_parameters()["total"] * 4
    kv_per_token = args.kv_bytes_per_token(4)
    fits = (weights + 64 * kv_per_token, "exactly enough")
    check_model_fits(args, torch.float32, torch.device("cpu"), max_model_len=64, probe=lambda d: fits)
    with pytest.raises(InsufficientMemoryError):
        check_model_fits(args, torch.float32, torch.device("cpu"), max_model_len=65, probe=lambda d: fits)


def test_serve_refuses_a_model_larger_than_ram_at_once() -> None:
    """The real probe: Mixtral-8x22B in bf16 (~262 GiB of weights) on this machine's RAM fails in seconds."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "mixtral.cli.main", "serve", "mixtral-8x22b", "--device", "cpu",
                           "--dtype", "bf16", "--port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert time.monotonic() - start < 60
    for fragment in ("does not fit", "GiB of bfloat16 weights", "--quantization"):
        assert fragment in proc.stderr
    assert "Traceback" not in proc.stderr


def test_lora_takes_the_training_run_folder_and_names_both_shapes(tmp_path: Path, caplog: Any) -> None:
    run = tmp_path / "run"
    save_nonzero_adapter(load_model("tiny", seed=0), run / "checkpoint-000010")
    assert find_adapter(run) == run / "checkpoint-000010"  # no final adapter yet: the latest checkpoint
    final = save_nonzero_adapter(load_model("tiny", seed=0), run / "adapter")
    assert find_adapter(run) == final and find_adapter(final) == final
    with pytest.raises(FileNotFoundError, match="no LoRA adapter"):
        find_adapter(tmp_path)
    other = load_model("tiny-odd", seed=0)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError) as info:
        merge_lora_into(other, run)
    message = str(info.value)
    tiny, odd = preset("tiny"), preset("tiny-odd")
    assert f"dim {tiny.dim}" in message and f"dim {odd.dim}" in message and "n_layers" in message
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())  # nothing merged half-way
    args = build_parser("serve").parse_args(["serve", "tiny", "--device", "cpu", "--lora", str(run),
                                             "--kv-cache-bytes", str(1 << 20), "--max-model-len", "64"])
    with caplog.at_level("INFO", logger="mixtral.serve"):
        engine = serve.load_engine(args)
    engine.shutdown()
    assert any(str(final) in r.getMessage() and "training run" in r.getMessage() for r in caplog.records)


def test_cors_only_when_asked(tiny_hf_checkpoint: Path) -> None:
    from starlette.testclient import TestClient

    from mixtral.engine.async_engine import AsyncEngine
    from mixtral.engine.llm_engine import LLMEngine
    from mixtral.serve.app import create_app

    llm = LLMEngine.from_config(str(tiny_hf_checkpoint), device="cpu", dtype="float32", max_model_len=64,
                                kv_cache_bytes=1 << 20)
    preflight = {"Origin": "http://ui.example", "Access-Control-Request-Method": "POST"}
    for origins, allowed in ((None, False), (["http://ui.example"], True)):
        app = create_app(AsyncEngine(llm), served_model_name="m", manage_engine=False, allowed_origins=origins)
        client = TestClient(app)  # no lifespan: only the middleware answers the preflight
        resp = client.options("/v1/chat/completions", headers=preflight)
        assert (resp.headers.get("access-control-allow-origin") == "http://ui.example") is allowed
    llm.shutdown()


def test_offline_hint_names_hf_download(tmp_path: Path, monkeypatch: Any) -> None:
    from mixtral.checkpoint.errors import CheckpointError
    from mixtral.checkpoint.hub import snapshot_metadata

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError) as info:
        snapshot_metadata("nobody/nothing")
    assert "`hf download nobody/nothing`" in str(info.value)
    # The command named exists: huggingface_hub installs `hf` next to this interpreter.
    assert (Path(sys.executable).parent / "hf").is_file() or shutil.which("hf") is not None
