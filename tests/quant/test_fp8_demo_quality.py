"""FP8 on the bundled demo model (fp32 on CPU, loaded with ``quantization="fp8"``: the real quantized model,
whose CPU path is quant/fp8.py's reference, which computes what the kernels compute): each layer's projections
and experts against fp32 on the same inputs, and the whole model's next-token predictions on held-out-style
text. The figures are printed (``-s``) and bounded."""

from __future__ import annotations

import math

import pytest
import torch

from mixtral.checkpoint.loader import demo_folder, load_model
from mixtral.model.moe import MoE
from mixtral.model.quantized import QuantLinear
from mixtral.tokenizer import Tokenizer

TEXTS = [
    "A journey of a thousand miles begins with a single step.",
    "Never put off till tomorrow what you can do today, unless you can avoid it altogether.",
    "Der frühe Vogel fängt den Wurm, aber die zweite Maus bekommt den Käse.",
    "El que madruga no siempre encuentra la puerta abierta.",
    "You will be successful in your work, but only after a long and quiet afternoon.",
    "What's the weather like in Paris today? I would like to know before I leave the house.",
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def setup():
    model = load_model("demo", "cpu", torch.float32)
    fp8 = load_model("demo", "cpu", torch.float32, quantization="fp8")
    tok = Tokenizer.from_file(demo_folder() / "tokenizer.model.v3")
    return model, fp8, tok


def _forward(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0]


def test_each_layer_against_fp32_on_the_same_inputs(setup, capsys) -> None:
    """Forward hooks on the FP8 model's quantized projections and MoE layers record what each received and
    returned; the fp32 weights multiply the same inputs (and the same routing) for the reference."""
    model, fp8, tok = setup
    seen: dict[str, tuple] = {}
    hooks = []
    for name, module in fp8.named_modules():
        if isinstance(module, (QuantLinear, MoE)):
            hooks.append(module.register_forward_hook(
                lambda m, args, out, name=name: seen.__setitem__(name, (args[0].detach().clone(), out))))
    try:
        _forward(fp8, [t for text in TEXTS for t in tok.encode(text)])
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for i, layer in enumerate(model.layers):
        att, ff = layer.attention, layer.feed_forward
        errs = {}
        for proj in ("wqkv", "wo"):
            x, y = seen[f"layers.{i}.attention.{proj}"]
            errs[proj] = _rel(y, x @ getattr(att, proj).weight.detach().T)
        x, (y, _) = seen[f"layers.{i}.feed_forward"]
        with torch.no_grad():
            _, weights, ids = ff.kernels.gate_route(x, ff.gate.weight, ff.top_k)  # the same gate weights
            exact = ff.kernels.moe_experts(x, ff.w13, ff.w2, weights, ids, ff.expert_start)
        errs["experts"] = _rel(y, exact)
        rows.append(errs)
    with capsys.disabled():
        print("\nFP8 vs fp32, relative output error per layer (demo model, same inputs):")
        for i, errs in enumerate(rows):
            print(f"  layer {i}: " + ", ".join(f"{k} {v:.4f}" for k, v in errs.items()))
    for errs in rows:
        assert errs["wqkv"] < 0.06 and errs["wo"] < 0.06 and errs["experts"] < 0.09, errs


def test_whole_model_predictions(setup, capsys) -> None:
    """Next-token perplexity, KL divergence from fp32 and greedy agreement of the FP8 model over every position.

    The demo model is small and unsure on free text (perplexity ~160 here), so many positions are near-ties
    that any rounding flips (bf16 against fp32 agrees on 93% of these positions); agreement is bounded where
    fp32's first choice leads the second by more than 0.1 in probability. Measured when written: perplexity
    -0.3%, KL 0.060 nats a token (bf16: 0.0095), agreement 83% overall and 94% (60 of 64) where decisive."""
    model, fp8, tok = setup
    nll = {"fp32": 0.0, "fp8": 0.0}
    kl, same, total, decisive, decisive_same = 0.0, 0, 0, 0, 0
    for text in TEXTS:
        tokens = tok.encode(text)
        ref = _forward(model, tokens)[:-1].float()  # [T-1, V]
        got = _forward(fp8, tokens)[:-1].float()
        target = torch.tensor(tokens[1:])
        nll["fp32"] += torch.nn.functional.cross_entropy(ref, target, reduction="sum").item()
        nll["fp8"] += torch.nn.functional.cross_entropy(got, target, reduction="sum").item()
        kl += torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                         reduction="sum").item()
        agree = ref.argmax(-1) == got.argmax(-1)  # [T-1]
        top2 = ref.softmax(-1).topk(2, dim=-1).values
        sure = (top2[:, 0] - top2[:, 1]) > 0.1
        same += agree.sum().item()
        decisive += sure.sum().item()
        decisive_same += (agree & sure).sum().item()
        total += len(tokens) - 1
    ppl = {k: math.exp(v / total) for k, v in nll.items()}
    with capsys.disabled():
        print(f"\nFP8 demo model over {total} positions of {len(TEXTS)} texts: perplexity fp32 {ppl['fp32']:.3f}, "
              f"fp8 {ppl['fp8']:.3f} ({100 * (ppl['fp8'] / ppl['fp32'] - 1):+.2f}%), KL {kl / total:.4f} nats/token, "
              f"greedy agreement {100 * same / total:.1f}% ({100 * decisive_same / decisive:.1f}% of {decisive} "
              "decisive positions)")
    assert abs(ppl["fp8"] / ppl["fp32"] - 1) < 0.03
    assert kl / total < 0.1
    assert decisive >= 40 and decisive_same / decisive >= 0.9
