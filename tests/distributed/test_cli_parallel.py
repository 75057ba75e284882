"""The parallelism flags (vLLM's names) on every command, what they become, `mixtral info`'s per-rank memory,
and a torchrun launch (the multi-host path, two ranks on this host) giving one process's tokens."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_faults import ENV

from mixtral.checkpoint.loader import load_model
from mixtral.cli.main import build_parser, main
from mixtral.cli.parallel_args import (
    add_parallel_args,
    parallel_config_from_args,
    parallel_engine_kwargs,
    run_torchrun_worker_if_rank,
)
from mixtral.distributed.config import ParallelConfig
from mixtral.distributed.errors import ParallelConfigError
from mixtral.engine.config import EngineConfig
from mixtral.engine.llm_engine import LLMEngine
from mixtral.sampling import SamplingParams
from mixtral.tokenizer import Tokenizer


def parse(*argv: str, server: bool = False) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_parallel_args(p, server=server)
    return p.parse_args(argv)


def test_flags_become_a_parallel_config() -> None:
    assert parallel_engine_kwargs(parse()) == {}
    assert parallel_engine_kwargs(parse("--enable-expert-parallel")) == {}  # one process: nothing to spread
    assert parallel_engine_kwargs(parse("-tp", "2")) == {"parallel_config": ParallelConfig(2)}
    config = parallel_config_from_args(parse("--tensor-parallel-size", "4", "--expert-parallel-size", "2"))
    assert config.describe() == "TP 2 x EP 2 (attention TP 4)"
    assert parallel_config_from_args(parse("-tp", "2", server=True)).exit_on_worker_failure
    assert not parallel_config_from_args(parse("-tp", "2")).exit_on_worker_failure
    with pytest.raises(ParallelConfigError, match="expert_parallel_size 3 must divide tensor_parallel_size 4"):
        parallel_config_from_args(parse("-tp", "4", "--expert-parallel-size", "3"))


def test_bad_sizes_are_refused_by_argparse(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse("--tensor-parallel-size", "0")
    assert exc.value.code == 2
    assert "expected a positive integer, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["serve"], ["generate", "x"], ["chat"], ["bench", "throughput"], ["info", "x"]])
def test_every_command_takes_the_flags(command: list[str]) -> None:
    args = build_parser(command[0]).parse_args([*command, "--tensor-parallel-size", "2", "--enable-expert-parallel"])
    assert parallel_config_from_args(args).describe() == "EP 2 (attention TP 2)"
    assert parallel_config_from_args(args).exit_on_worker_failure == (command[0] == "serve")


def test_info_prints_the_share_of_each_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "mixtral-8x7b", "--tensor-parallel-size", "2", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    rank = info["per_rank"]
    assert rank["layout"] == "TP 2" and rank["ranks"] == 2
    assert rank["parameters"] < info["parameters"]["total"] // 2 + rank["replicated_parameters"] + 1
    assert rank["kv_bytes_per_token"]["bf16"] * 2 == info["kv_bytes_per_token"]["bf16"]
    assert main(["info", "tiny-odd", "-tp", "4"]) == 1  # 6 heads do not split 4 ways
    assert "n_heads (6) is not divisible by tensor_parallel_size 4" in capsys.readouterr().err


def test_serve_refuses_lora_with_tensor_parallelism(tmp_path: Path) -> None:
    from mixtral.cli.serve import load_engine

    args = build_parser("serve").parse_args(["serve", "tiny", "--lora", str(tmp_path), "-tp", "2"])
    with pytest.raises(ValueError, match="--lora merges the adapter into one process's weights"):
        load_engine(args)


def test_a_torchrun_rank_with_the_wrong_size_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit, match="torchrun started 4 ranks but --tensor-parallel-size is 2"):
        run_torchrun_worker_if_rank(parse("-tp", "2"))
    monkeypatch.setenv("RANK", "0")
    run_torchrun_worker_if_rank(parse("-tp", "2"))  # rank 0 drives: returns


def test_torchrun_two_ranks_equal_one_process(tiny_hf_checkpoint: Path) -> None:
    script = Path(__file__).with_name("torchrun_script.py")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(tiny_hf_checkpoint), "--tensor-parallel-size", "2"],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])["tokens"]
    engine = LLMEngine(load_model(str(tiny_hf_checkpoint)), EngineConfig(max_model_len=128, num_kv_blocks=64),
                       Tokenizer.from_version("v3"))
    engine.add_request("a", list(range(200, 230)), SamplingParams(temperature=0, max_tokens=8))
    while engine.has_unfinished_requests():
        outs = engine.step()
    assert got == list(outs[0].outputs[0].token_ids)
