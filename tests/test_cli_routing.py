"""``mixtral routing``: end to end on a checkpoint folder and on the bundled demo model (the default)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mixtral.analysis.routing_capture import capture_routing
from mixtral.checkpoint.loader import load_model, resolve
from mixtral.cli.main import main
from mixtral.tokenizer import Tokenizer

PROMPTS = [
    {"prompt": "The weather is nice today.", "label": "en"},
    {"prompt": "Das Wetter ist heute schön.", "label": "de"},
    {"messages": [{"role": "user", "content": "Hello there"}], "label": "en"},
    {"text": "def f(x):\n    return x + 1"},
]


def _write(path: Path) -> Path:
    path.write_text("\n".join(json.dumps(p) for p in PROMPTS) + "\n")
    return path


def test_report_on_a_checkpoint(tiny_hf_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    prompts = _write(tmp_path / "prompts.jsonl")
    out = tmp_path / "report"
    assert main(["routing", str(prompts), "--model", str(tiny_hf_checkpoint), "--output-dir", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "label 'de'" in printed and "label 'en'" in printed and "max/mean" in printed
    data = json.loads((out / "routing_report.json").read_text())
    png = (out / "routing_report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # The counts are those of the model's routing of each prompt, as encoded.
    model = load_model(tiny_hf_checkpoint, dtype=torch.float32)
    tok = Tokenizer.for_model(resolve(str(tiny_hf_checkpoint)))
    encoded = [tok.encode_chat(p["messages"]) if "messages" in p else tok.encode(p.get("prompt") or p["text"])
               for p in PROMPTS]
    experts = [capture_routing(model, ids)[0] for ids in encoded]
    E = model.args.num_experts
    want = sum(np.stack([np.bincount(e[:, la].ravel(), minlength=E) for la in range(model.args.n_layers)])
               for e in experts)
    assert [layer["counts"] for layer in data["layers"]] == want.tolist()
    assert data["num_tokens"] == sum(len(ids) for ids in encoded) and data["num_prompts"] == 4
    assert sorted(data["labels"]) == ["de", "en"]
    assert data["labels"]["en"]["tokens"] == len(encoded[0]) + len(encoded[2])
    for layer in data["layers"]:
        assert 1.0 <= layer["imbalance"] <= E / model.args.num_experts_per_tok
        assert 0.0 < layer["token_entropy_normalized"] <= 1.0
        assert sum(sum(row) for row in layer["cooccurrence"]) == 2 * data["num_tokens"]  # k=2: one pair per token


def test_demo_model_by_default(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    prompts = _write(tmp_path / "prompts.jsonl")
    assert main(["routing", str(prompts), "--output-dir", str(tmp_path / "r"), "--no-progress"]) == 0
    data = json.loads((tmp_path / "r" / "routing_report.json").read_text())
    assert data["model"] == "demo" and data["num_layers"] == 4 and data["num_experts"] == 8
    assert "demo: 4 prompts" in capsys.readouterr().out


def test_bad_input_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    assert main(["routing", str(bad), "--output-dir", str(tmp_path / "r")]) == 2
    assert "bad.jsonl:2: 'prompt' must be a non-empty string, got 3" in capsys.readouterr().err
    assert main(["routing", str(tmp_path / "none.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["routing", str(bad), "--max-tokens-per-prompt", "0"]) == 2
    assert not (tmp_path / "r").exists()
