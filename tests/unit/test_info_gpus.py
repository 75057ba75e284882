"""``mixtral info --quantization``: the longest context that fits one 80 GB H100 and one 141 GB H200 beside the
weights as loaded, capped at the model's own context length (issue 20: Mixtral-8x22B in int4)."""

from __future__ import annotations

import json

import pytest

from mixtral.cli.info import GPU_80GB_BYTES, GPU_141GB_BYTES
from mixtral.cli.main import main


def test_8x22b_int4_context_on_an_h100_and_an_h200(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "mixtral-8x22b", "--quantization", "int4", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["memory_plan"]
    per_token = 56 * 2 * 8 * 128 * 2  # bf16 K and V of every layer
    for fit, gpu in ((plan, GPU_80GB_BYTES), (plan["h200"], GPU_141GB_BYTES)):
        room = int(gpu * 0.9) - plan["weight_bytes"]["total"]
        assert fit["kv_room_bytes"] == room and fit["max_context_tokens"] == {"bf16": room // per_token,
                                                                              "fp8": room // (per_token // 2)}
    assert 10_000 < plan["max_context_tokens"]["bf16"] < 65_536 < plan["h200"]["max_context_tokens"]["bf16"]

    assert main(["info", "mixtral-8x22b", "-q", "int4"]) == 0
    out = capsys.readouterr().out
    h100 = f"{plan['max_context_tokens']['bf16']:,} tokens (bf16 KV), {plan['max_context_tokens']['fp8']:,} (fp8 KV)"
    assert f"on one 80 GB GPU (H100) at 0.9: KV room 3.20 GiB, longest context {h100} of 65,536" in out
    assert "on one 141 GB GPU (H200) at 0.9: KV room 57.88 GiB, longest context the model's full 65,536 tokens" in out


def test_a_model_too_big_for_either_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "mixtral-8x22b"]) == 0
    out = capsys.readouterr().out
    assert "on one 80 GB GPU (H100) at 0.9: KV room 0.00 MiB: the weights do not fit (190.65 GiB over)" in out
    assert "on one 141 GB GPU (H200) at 0.9: KV room 0.00 MiB: the weights do not fit (135.97 GiB over)" in out
