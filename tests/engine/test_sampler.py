"""The batched sampler against direct per-row computations, and SamplingParams validation."""

from __future__ import annotations

import math

import pytest
import torch

from mixtral.engine.sampler import Sampler, SampleRow, uniform_noise
from mixtral.sampling import SamplingParams

V = 50


def _rows(params: list[SamplingParams], seeds: list[int] | None = None, step: int = 0,
          outputs: list[list[int]] | None = None, prompts: list[list[int]] | None = None) -> list[SampleRow]:
    n = len(params)
    seeds = seeds or list(range(n))
    outputs = outputs or [[] for _ in range(n)]
    prompts = prompts or [[1] for _ in range(n)]
    return [SampleRow(p, s, step, pr, o) for p, s, pr, o in zip(params, seeds, prompts, outputs, strict=True)]


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3  # [R, V]


def test_greedy_is_exactly_argmax_and_filters_that_leave_one_token_are_greedy() -> None:
    logits = _logits(5)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_k=1),
              SamplingParams(temperature=1.0, top_p=1e-6), SamplingParams(temperature=2.0, min_p=1.0),
              SamplingParams(temperature=0.0, top_k=3)]
    out = Sampler(V)(logits, _rows(params))
    assert out.token_ids == logits.argmax(-1).tolist()
    want_lp = torch.log_softmax(logits, -1).gather(1, logits.argmax(-1, keepdim=True)).squeeze(1)
    assert out.logprobs == pytest.approx(want_lp.tolist(), abs=1e-6)


def test_noise_is_a_function_of_seed_step_and_index_only() -> None:
    seeds = torch.tensor([7, 7, 8, 2**40 + 7])
    steps = torch.tensor([0, 1, 0, 0])
    u = uniform_noise(seeds, steps, 1000)  # [4, 1000]
    assert torch.equal(u, uniform_noise(seeds, steps, 1000))
    assert torch.equal(u[0], uniform_noise(seeds[:1], steps[:1], 1000)[0])
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2]) and not torch.equal(u[0], u[3])
    assert u.min() > 0.0 and u.max() < 1.0
    assert abs(u.mean().item() - 0.5) < 0.02 and abs(u.var().item() - 1 / 12) < 0.01


def test_sampling_follows_the_distribution() -> None:
    """Many seeds, one row each: the empirical distribution matches softmax(logits / T) within 4 sigma."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0] + [-30.0] * (V - 5)])
    temp = 0.7
    n = 3000
    params = [SamplingParams(temperature=temp)] * n
    out = Sampler(V)(logits.expand(n, V), _rows(params, seeds=list(range(n))))
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=V).float()
    p = torch.softmax(logits[0] / temp, -1)
    sigma = (n * p * (1 - p)).sqrt()
    assert ((counts - n * p).abs() <= 4 * sigma + 1).all(), (counts[:5], n * p[:5])


def test_top_k_top_p_min_p_keep_only_allowed_tokens() -> None:
    logits = _logits(1, seed=3)
    order = logits[0].argsort(descending=True)
    probs = torch.softmax(logits[0], -1)
    n = 400
    cases = {
        # temperature 1: the filters act on ``probs`` itself.
        "top_k": (SamplingParams(temperature=1.0, top_k=3), set(order[:3].tolist())),
        "top_p": (SamplingParams(temperature=1.0, top_p=0.5),
                  set(order[: int((probs[order].cumsum(0) < 0.5).sum()) + 1].tolist())),
        "min_p": (SamplingParams(temperature=1.0, min_p=0.2),
                  set(torch.nonzero(probs >= 0.2 * probs.max()).flatten().tolist())),
    }
    for name, (params, allowed) in cases.items():
        out = Sampler(V)(logits.expand(n, V), _rows([params] * n, seeds=list(range(n))))
        got = set(out.token_ids)
        assert got <= allowed, name
        assert len(got) == len(allowed), f"{name}: some allowed tokens were never drawn"


def test_penalties_match_a_per_row_reference() -> None:
    logits = _logits(3, seed=4)
    prompts = [[1, 2, 3], [4], [5, 5]]
    outputs = [[3, 3, 7], [4, 8], []]
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.3),
              SamplingParams(temperature=0.0, presence_penalty=1.5, frequency_penalty=0.5),
              SamplingParams(temperature=0.0)]
    sampler = Sampler(V)
    tensors = sampler.prepare(_rows(params, prompts=prompts, outputs=outputs), logits.device)
    got = sampler._apply_penalties(logits.clone(), tensors)
    want = logits.clone()
    for r, p in enumerate(params):
        for tok in set(prompts[r]) | set(outputs[r]):
            x = want[r, tok]
            want[r, tok] = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
        for tok in set(outputs[r]):
            want[r, tok] -= p.frequency_penalty * outputs[r].count(tok) + p.presence_penalty
    assert torch.allclose(got, want, atol=1e-6)


def test_logprobs_report_top_k_and_the_sampled_token() -> None:
    logits = _logits(2, seed=5)
    params = [SamplingParams(temperature=0.0, logprobs=3), SamplingParams(temperature=1.0, logprobs=0)]
    out = Sampler(V)(logits, _rows(params))
    lp = torch.log_softmax(logits, -1)
    top = out.top_logprobs[0]
    assert top is not None and set(top) == set(lp[0].topk(3).indices.tolist())
    for tok, value in top.items():
        assert value == pytest.approx(lp[0, tok].item(), abs=1e-6)
    assert out.top_logprobs[1] == {out.token_ids[1]: pytest.approx(lp[1, out.token_ids[1]].item(), abs=1e-6)}


def test_min_tokens_bans_eos_until_reached() -> None:
    logits = torch.zeros(1, V)
    logits[0, 2] = 10.0  # EOS is by far the likeliest
    sampler = Sampler(V, eos_id=2)
    params = SamplingParams(temperature=0.0, min_tokens=2)
    assert sampler(logits, _rows([params], step=0)).token_ids != [2]
    assert sampler(logits, _rows([params], step=2)).token_ids == [2]


def test_a_guide_allowing_only_eos_wins_over_min_tokens() -> None:
    """min_tokens bans EOS, a finished grammar allows only EOS: the row samples EOS, not token 0 (what argmax
    of an all -inf row returns); a row with other allowed tokens still has EOS banned."""
    eos = 7
    logits = _logits(2, seed=3)
    bitmask = torch.zeros(2, 2, dtype=torch.int32)  # [R, W] 2 words cover V = 50
    bitmask[0, 0] = 1 << eos  # row 0: only EOS
    bitmask[1, 0] = (1 << eos) | (1 << 3)  # row 1: EOS or token 3
    params = [SamplingParams(temperature=0.0, min_tokens=5), SamplingParams(temperature=0.0, min_tokens=5)]
    out = Sampler(V, eos_id=eos)(logits, _rows(params), bitmask)
    assert out.token_ids == [eos, 3]
    assert math.isfinite(out.logprobs[0])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"n": 0}, "n must"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"logprobs": 21}, "logprobs"),
    ({"stop": [""]}, "stop"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"guide": object()}, "guide"),
])
def test_sampling_params_reject_bad_values_naming_them(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_normalise_stop() -> None:
    p = SamplingParams(stop="###", stop_token_ids=None)
    assert p.stop == ["###"] and p.stop_token_ids == []
    assert p.effective_top_k == 0 and SamplingParams(top_k=0).effective_top_k == 0
    assert not math.isnan(p.temperature)


def test_all_greedy_steps_copy_no_per_row_settings_and_mixed_steps_do() -> None:
    # Argmax reads none of temperature/top-k/top-p/min-p/seeds: an all-greedy step skips building and copying
    # them (host time on every decode step); one random row brings them back, and greedy rows stay exact.
    logits = _logits(3, seed=6)
    copied: list[str] = []

    def put(name: str, host: torch.Tensor) -> torch.Tensor:
        copied.append(name)
        return host

    sampler = Sampler(V)
    greedy = _rows([SamplingParams(temperature=0.0)] * 3)
    t = sampler.prepare(greedy, logits.device, put)
    assert copied == [] and t.all_greedy and t.temperature is None
    assert sampler(logits, greedy, tensors=t).token_ids == logits.argmax(-1).tolist()
    mixed = _rows([SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_k=5), SamplingParams()])
    t = sampler.prepare(mixed, logits.device, put)
    assert copied == ["sampling_floats", "sampling_ints"] and not t.all_greedy
    out = sampler(logits, mixed, tensors=t)
    assert out.token_ids[0] == int(logits[0].argmax())
    assert out.token_ids[1] in logits[1].topk(5).indices.tolist()
