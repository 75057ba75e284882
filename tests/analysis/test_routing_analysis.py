"""``mixtral.analysis``: the captured routing against transformers' router and the engine's own counters, the
statistics against hand-computed values, and the prompts file's errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from mixtral.analysis.routing_capture import PromptRouting, capture_routing, read_prompts, route_prompt
from mixtral.analysis.routing_stats import RoutingReport, build_report
from mixtral.checkpoint.loader import load_model, resolve
from mixtral.engine.llm_engine import LLMEngine
from mixtral.sampling import SamplingParams
from mixtral.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tiny_model(tiny_hf_checkpoint: Path) -> torch.nn.Module:
    return load_model(tiny_hf_checkpoint, dtype=torch.float32).eval()


def test_captured_experts_are_transformers_router_choices(tiny_hf_checkpoint: Path, tiny_model: torch.nn.Module
                                                          ) -> None:
    ids = torch.randint(3, tiny_model.args.vocab_size, (37,), generator=torch.Generator().manual_seed(5)).tolist()
    experts, weights, probs = capture_routing(tiny_model, ids)
    L, k, E = tiny_model.args.n_layers, tiny_model.args.num_experts_per_tok, tiny_model.args.num_experts
    assert experts.shape == weights.shape == (37, L, k) and probs.shape == (37, L, E)
    ref = transformers.MixtralForCausalLM.from_pretrained(tiny_hf_checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        router_logits = ref(torch.tensor([ids]), output_router_logits=True).router_logits  # L x [T, E]
    assert len(router_logits) == L
    for layer, logits in enumerate(router_logits):
        p = torch.softmax(logits.float(), dim=-1)  # [T, E]
        w, i = torch.topk(p, k, dim=-1)
        assert (experts[:, layer] == i.numpy()).all(), f"layer {layer}"
        assert np.allclose(weights[:, layer], (w / w.sum(-1, keepdim=True)).numpy(), atol=1e-5)
        assert np.allclose(probs[:, layer], p.numpy(), atol=1e-5)
    # Routing is far from uniform on this model, so agreement above is not a coincidence of ties.
    assert (weights[..., 0] - weights[..., 1]).mean() > 0.05


def test_captured_counts_equal_the_engines_expert_counters(tiny_hf_checkpoint: Path, tiny_model: torch.nn.Module
                                                           ) -> None:
    """The engine counts every token it processes per (layer, expert): a one-token request processes exactly the
    prompt, so its counters must equal the capture's."""
    tok = Tokenizer.for_model(resolve(str(tiny_hf_checkpoint)))
    prompt = tok.encode("Routing is counted the same way offline and in the engine.", bos=True)
    engine = LLMEngine.from_config(str(tiny_hf_checkpoint), device="cpu", dtype="float32", max_model_len=128,
                                   kv_cache_bytes=2 << 20)
    engine.add_request("r", prompt, SamplingParams(max_tokens=1, temperature=0))
    while engine.has_unfinished_requests():
        engine.step()
    experts, _, _ = capture_routing(tiny_model, prompt)
    counts = np.stack([np.bincount(experts[:, layer].ravel(), minlength=tiny_model.args.num_experts)
                       for layer in range(tiny_model.args.n_layers)])  # [L, E]
    assert counts.sum() == len(prompt) * tiny_model.args.n_layers * tiny_model.args.num_experts_per_tok
    assert (engine.expert_counts().numpy() == counts).all()


def _routed(label: str | None, experts: list[list[list[int]]], probs: np.ndarray | None = None) -> PromptRouting:
    arr = np.array(experts)  # [T, L, k]
    t, n_layers, _ = arr.shape
    if probs is None:
        probs = np.full((t, n_layers, 4), 0.25)
    return PromptRouting(label, list(range(t)), arr, np.full(arr.shape, 0.5), probs)


def test_statistics_by_hand() -> None:
    # 2 layers, 4 experts, top-2. Layer 0 balanced over 4 tokens; layer 1 always experts (0, 1).
    a = _routed("x", [[[0, 1], [0, 1]], [[2, 3], [1, 0]]])
    b = _routed("y", [[[0, 2], [1, 0]], [[1, 3], [0, 1]]], probs=np.tile([1.0, 0.0, 0.0, 0.0], (2, 2, 1)))
    report = build_report([a, b], num_experts=4)
    assert report.num_tokens == 4 and report.num_prompts == 2
    assert report.counts.tolist() == [[2, 2, 2, 2], [4, 4, 0, 0]]
    assert report.imbalance.tolist() == [1.0, 2.0]
    assert report.cv[0] == 0.0 and report.cv[1] == pytest.approx(1.0)
    assert report.pairs[1, 0, 1] == report.pairs[1, 1, 0] == 4 and report.pairs[1].sum() == 8
    assert report.pairs[0, 0, 1] == 1 and report.pairs[0, 2, 3] == 1 and report.pairs[0, 0, 2] == 1
    assert report.top_pairs(1) == [{"experts": [0, 1], "tokens": 4, "share_of_tokens": 1.0}]
    # Entropy: prompt a uniform (ln 4 each token), prompt b one-hot (0): mean ln(4) / 2.
    assert report.token_entropy.tolist() == pytest.approx([math.log(4) / 2] * 2)
    assert report.load_entropy.tolist() == pytest.approx([math.log(4), math.log(2)])
    # Labels: x sent layer 0 to (0,1),(2,3); y to (0,2),(1,3) -> same load in layer 0: lift 1, no divergence.
    assert report.lift("x")[0].tolist() == [1.0] * 4 and report.divergence("x")[0] == pytest.approx(0.0)
    data = report.to_json()
    assert data["labels"]["x"]["counts"] == [[1, 1, 1, 1], [2, 2, 0, 0]]
    assert data["labels"]["x"]["lift"][1][2] is None  # nobody chose expert 2 in layer 1: undefined, not NaN
    assert data["layers"][1]["imbalance"] == 2.0


def test_label_preference_and_divergence() -> None:
    # Label "a" always routes to expert 0 (with 1), "b" to expert 3 (with 2): each prefers its own expert.
    a = _routed("a", [[[0, 1]]] * 6)
    b = _routed("b", [[[3, 2]]] * 2)
    report = build_report([a, b], num_experts=4)
    assert report.lift("a")[0].tolist() == pytest.approx([8 / 6, 8 / 6, 0.0, 0.0])
    assert report.lift("b")[0].tolist() == pytest.approx([0.0, 0.0, 4.0, 4.0])
    summary = report.label_summary("b")
    assert summary["per_layer"][0]["preferred_expert"] in (2, 3) and summary["per_layer"][0]["lift"] == 4.0
    # Disjoint supports: JS divergence from the mixture is positive, and larger for the smaller label.
    assert 0 < report.divergence("a")[0] < report.divergence("b")[0] <= 1.0
    with pytest.raises(ValueError, match="does not fit"):
        RoutingReport(2, 4, 2).add(a)


def test_prompt_file_errors_name_the_line(tmp_path: Path) -> None:
    good = tmp_path / "ok.jsonl"
    good.write_text('# comment\n\n{"prompt": "hi", "label": "en"}\n{"messages": [{"role": "user", "content": "x"}]}\n')
    specs = read_prompts(good)
    assert [(s.line, s.label, s.text) for s in specs] == [(3, "en", "hi"), (4, None, None)]
    for body, match in [
        ('{"prompt": "a"}\n{bad json}\n', r"bad.jsonl:2: not valid JSON"),
        ('["a"]\n', r":1: each line must be a JSON object, got list"),
        ('{"prompt": "a", "text": "b"}\n', r"exactly one of 'prompt', 'text' or 'messages', got \['prompt', 'text'\]"),
        ('{"label": "x"}\n', r"got none"),
        ('{"prompt": ""}\n', r"'prompt' must be a non-empty string"),
        ('{"messages": []}\n', r"'messages' must be a non-empty list"),
        ('{"prompt": "a", "label": [1]}\n', r"'label' must be a string"),
        ("# only a comment\n", r"holds no prompts"),
    ]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(body)
        with pytest.raises(ValueError, match=match):
            read_prompts(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompts(tmp_path / "missing.jsonl")


def test_long_prompts_are_cut_to_the_limit(tiny_hf_checkpoint: Path, tiny_model: torch.nn.Module,
                                           tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "one two three four five six seven eight nine ten"}\n')
    tok = Tokenizer.for_model(resolve(str(tiny_hf_checkpoint)))
    routed = route_prompt(tiny_model, tok, read_prompts(path)[0], max_tokens=4)
    assert len(routed.token_ids) == 4 and routed.experts.shape[0] == 4
