"""Training as users run it: OpenAI-style chat records, and resuming a finished run with a larger --max-steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mixtral.tokenizer import Tokenizer
from mixtral.train.config import TrainConfig
from mixtral.train.data import CONTEXT, TARGET, Encoder, build_dataset, pack, save_packed
from mixtral.train.trainer import train

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"location": {"type": "string"}}}}}


def _openai_chat(call_id: str) -> list[dict]:
    return [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function",
             "function": {"name": "get_weather", "arguments": '{"location": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": call_id, "name": "get_weather", "content": "sunny, 21 C"},
        {"role": "assistant", "content": "It is sunny in Paris."},
    ]


@pytest.mark.parametrize("call_id", ["call_8f3kq2", "0b5e1c9e-6a0b-4d8e-9d4c-5f2a7e1b3c44"])
def test_openai_tool_call_ids_train_on_the_served_prompt(tmp_path: Path, call_id: str) -> None:
    """OpenAI ids are not Mistral's 9 characters: the training encoder maps them as serving does, so the trained
    tokens are exactly the prompt the server builds for the same conversation, plus the final answer."""
    messages = _openai_chat(call_id)
    ids, codes = Encoder("v3").encode_chat({"messages": messages, "tools": [WEATHER]})
    served = Tokenizer.from_version("v3").encode_chat(messages[:-1], [WEATHER])
    assert ids[:len(served)] == served
    assert codes[len(served):] == [TARGET] * (len(ids) - len(served))  # the answer and its </s>
    # And through a JSONL file, as `mixtral train --data` reads it.
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": messages, "tools": [WEATHER]}) + "\n")
    ds = build_dataset([path], seq_len=len(ids), tokenizer="v3")
    assert ds.tokens[0].tolist() == ids


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    docs = [([1, *range(100 + i % 7, 112 + i % 7)], [CONTEXT] + [TARGET] * 12) for i in range(24)]
    path = tmp_path_factory.mktemp("data") / "packed.safetensors"
    save_packed(pack(docs, seq_len=32), path)
    return path


def _cfg(data: Path, out: Path, **kw: object) -> TrainConfig:
    base = dict(data=[str(data)], output_dir=str(out), preset="tiny", batch_size=2, lr=3e-3, warmup_steps=2,
                log_every=1, eval_fraction=0.0, progress=False, heatmap=False, bf16=False, device="cpu",
                save_dtype="float32")
    return TrainConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_resume_with_a_larger_max_steps_continues_the_run(packed: Path, tmp_path: Path, capsys) -> None:
    """A finished 2-step run resumed with --max-steps 4 trains 2 more steps, the same ones a 4-step run takes
    (the warm-up covers steps 0-1, so both runs' first steps agree)."""
    full = train(_cfg(packed, tmp_path / "full", max_steps=4))
    train(_cfg(packed, tmp_path / "short", max_steps=2, save_every=2))
    more = train(_cfg(packed, tmp_path / "short", max_steps=4, resume="latest"))
    assert len(more.steps) == 2
    for want, got in zip(full.steps[2:], more.steps, strict=True):
        assert got.lr == want.lr and got.loss == pytest.approx(want.loss, rel=1e-6, abs=1e-6)
    # Resuming a run at its end says so instead of silently training nothing.
    capsys.readouterr()
    again = train(_cfg(packed, tmp_path / "full2", max_steps=2, resume=str(tmp_path / "short" / "checkpoint-000002")))
    assert again.steps == [] and "nothing to train" in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "message"), [
    (["--preset", "tiny", "--data", "{tmp}/missing.jsonl"], "missing.jsonl not found"),
    (["--preset", "tiny", "--model", "demo", "--data", "{tmp}/d.txt"], "exactly one of"),
    (["--preset", "nope", "--data", "{tmp}/d.txt"], "unknown preset 'nope'"),
    (["--preset", "tiny", "--data", "{tmp}/user_only.jsonl"], "user_only.jsonl:1"),
])
def test_train_cli_errors_are_one_line(tmp_path: Path, capsys, flags: list[str], message: str) -> None:
    from mixtral.cli.main import main

    (tmp_path / "d.txt").write_text("some text\n")
    (tmp_path / "user_only.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    argv = ["train", *[f.format(tmp=tmp_path) for f in flags], "-o", str(tmp_path / "out"), "--device", "cpu",
            "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("mixtral train: error: ") and message in err and "Traceback" not in err


def test_a_bare_tokenizer_model_file_is_read_by_its_vocabulary(tmp_path: Path) -> None:
    """Hub repos ship the v3 tokenizer as a bare ``tokenizer.model``: --tokenizer FILE must encode tools with it."""
    import shutil

    from mixtral.checkpoint.tokenizer_files import packaged_tokenizer

    bare = tmp_path / "tokenizer.model"
    shutil.copy(packaged_tokenizer("v3"), bare)
    record = {"messages": _openai_chat("call_1"), "tools": [WEATHER]}
    assert Encoder(bare).encode_chat(record) == Encoder("v3").encode_chat(record)


def test_data_from_another_vocabulary_is_refused(tmp_path: Path) -> None:
    text = tmp_path / "d.txt"
    text.write_text("Some words to train on.\n")
    with pytest.raises(ValueError, match="32768 ids but the model's vocabulary has 32000"):
        train(_cfg(text, tmp_path / "a", preset="tiny-v1", tokenizer="v3", max_steps=1))
    packed = tmp_path / "v3.safetensors"
    save_packed(pack([([1, 32500, 2], [CONTEXT, TARGET, TARGET])], seq_len=8), packed)
    with pytest.raises(ValueError, match="token id 32500, outside the model's vocabulary of 32000"):
        train(_cfg(packed, tmp_path / "b", preset="tiny-v1", max_steps=1))


def test_resume_refuses_a_checkpoint_of_another_kind(packed: Path, tmp_path: Path) -> None:
    """LoRA checkpoints resume only with the same rank and targets (in any order); full ones only without LoRA."""
    lora = dict(lora_rank=2, lora_targets=("wqkv", "wo"), save_every=1, max_steps=1)
    train(_cfg(packed, tmp_path / "lora", **lora))
    train(_cfg(packed, tmp_path / "full", save_every=1, max_steps=1))
    lora_ckpt, full_ckpt = str(tmp_path / "lora" / "checkpoint-000001"), str(tmp_path / "full" / "checkpoint-000001")
    with pytest.raises(ValueError, match="rank 2 on wqkv wo, but this run asks for rank 4"):
        train(_cfg(packed, tmp_path / "r1", **{**lora, "lora_rank": 4}, resume=lora_ckpt))
    with pytest.raises(ValueError, match="is a LoRA checkpoint"):
        train(_cfg(packed, tmp_path / "r2", resume=lora_ckpt))
    with pytest.raises(ValueError, match="is a full fine-tuning checkpoint"):
        train(_cfg(packed, tmp_path / "r3", **lora, resume=full_ckpt))
    resumed = train(_cfg(packed, tmp_path / "r4", **{**lora, "lora_targets": ("wo", "wqkv"), "max_steps": 2},
                         resume=lora_ckpt))
    assert len(resumed.steps) == 1
