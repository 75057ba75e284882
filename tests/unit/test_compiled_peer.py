"""The gpt-fast style peer of ``mixtral bench gpu --peer compiled`` computes Mixtral: on CPU in fp32, its prefill
and per-token decode over the static cache give the model's full-sequence logits (the decode step's per-token
expert indexing, the prefill's per-expert GEMMs), and its decode step compiles whole with the same tokens."""

from __future__ import annotations

import pytest
import torch

from mixtral.bench.compiled_peer import StaticCacheMixtral, greedy_decode
from mixtral.model.mixtral import Transformer, init_random_weights
from mixtral.model.presets import PRESETS


def _model() -> Transformer:
    model = Transformer(PRESETS["tiny"]).eval()
    init_random_weights(model, seed=3, std=0.1)
    return model


def test_prefill_and_decode_match_the_full_sequence_logits() -> None:
    model = _model()
    margs = model.args
    gen = torch.Generator().manual_seed(0)
    seq = torch.randint(0, margs.vocab_size, (2, 11), generator=gen)  # [B, T]
    with torch.no_grad():
        ref = model(seq)  # [B, T, V]
        peer = StaticCacheMixtral(model, margs, batch=2, max_len=16)
        got = [peer(seq[:, :7], torch.arange(7))]  # prefill 7 tokens: logits of position 6
        for pos in range(7, 11):  # then one token a step, per-token expert indexing
            got.append(peer(seq[:, pos:pos + 1], torch.tensor([pos])))
    for i, logits in enumerate(got):
        torch.testing.assert_close(logits, ref[:, 6 + i], rtol=1e-4, atol=1e-4)


def test_greedy_decode_follows_the_models_argmax() -> None:
    """Greedy tokens from the peer equal greedy tokens re-derived from full-sequence logits; a cache position
    written at the wrong place or a mask one position off would change them."""
    model = _model()
    margs = model.args
    prompts = torch.randint(0, margs.vocab_size, (3, 5), generator=torch.Generator().manual_seed(1))
    toks = greedy_decode(StaticCacheMixtral(model, margs, batch=3, max_len=16), prompts, steps=6)  # [B, 6]
    seq = prompts
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(toks, seq[:, 5:])


def test_bench_plot_draws_every_peer(tmp_path: object) -> None:
    """The decode picture has a line for us, the roofline and each peer that ran (a batch a peer could not run
    is left out of its line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mixtral.bench import gpu_table

    bf16 = {"decode": [{"batch": b, "tok_s": 10.0 * b, "roofline_tok_s": 12.0 * b} for b in (1, 8)],
            "peer_hf": [{"batch": 1, "tok_s": 2.0}, {"batch": 8, "tok_s": None}],
            "peer_compiled": [{"batch": 1, "tok_s": 5.0}, {"batch": 8, "tok_s": 30.0}]}
    results = {"model": "tiny", "dtype": "bf16", "device": "test", "schemes": {"bf16": bf16}}
    saved: list[object] = []
    real_close = plt.close
    plt.close = lambda fig=None: saved.append(fig)  # keep the figure to read its lines
    try:
        path = tmp_path / "decode.png"  # type: ignore[operator]
        gpu_table.plot_decode(results, path)
    finally:
        plt.close = real_close
    lines = {ln.get_label(): list(ln.get_ydata()) for ln in saved[0].axes[0].get_lines()}  # type: ignore[attr-defined]
    assert lines["transformers MixtralForCausalLM"] == [2.0]
    assert lines["torch.compile decode (gpt-fast style)"] == [5.0, 30.0]
    assert path.stat().st_size > 0  # type: ignore[attr-defined]


@pytest.mark.slow
def test_the_decode_step_compiles_whole_and_matches_eager() -> None:
    """``torch.compile(fullgraph=True)`` takes the one-token step as one graph (a graph break would raise) and
    its greedy tokens equal the eager step's (Inductor's CPU backend here; the GPU bench adds CUDA graphs)."""
    model = _model()
    prompts = torch.randint(0, model.args.vocab_size, (2, 5), generator=torch.Generator().manual_seed(2))
    peer = StaticCacheMixtral(model, model.args, batch=2, max_len=16)
    compiled = greedy_decode(peer, prompts, 5, torch.compile(peer, fullgraph=True))
    assert torch.equal(compiled, greedy_decode(StaticCacheMixtral(model, model.args, 2, 16), prompts, 5))
