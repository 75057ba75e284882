"""Engine-level sampling: seeds reproducible in any batch, n > 1 samples sharing the prompt, constrained
decoding through a TokenGuide, logprobs, admission errors."""

from __future__ import annotations

import pytest
import torch
from engine_testing import greedy_reference, random_prompts, run_to_completion

from mixtral.engine.llm_engine import RequestTooLongError
from mixtral.guide import bitmask_words
from mixtral.sampling import SamplingParams


def test_seeded_request_samples_the_same_alone_and_in_a_full_batch(make_engine) -> None:
    prompt = [1, 100, 200, 300, 400]
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=12)
    alone = make_engine()
    alone.add_request("s", prompt, params)
    want = run_to_completion(alone)["s"].outputs[0].token_ids

    busy = make_engine(num_kv_blocks=40, block_size=4, max_num_batched_tokens=24)  # preemption and chunking too
    for i, p in enumerate(random_prompts(15, 5, 30, seed=5)):
        busy.add_request(f"noise{i}", p, SamplingParams(temperature=0.9, max_tokens=10))
    busy.add_request("s", prompt, params)
    done = run_to_completion(busy)
    assert done["s"].outputs[0].token_ids == want
    assert busy.get_stats().num_preemptions > 0

    other = make_engine()
    other.add_request("s", prompt, SamplingParams(temperature=1.0, top_p=0.95, seed=99, max_tokens=12))
    assert run_to_completion(other)["s"].outputs[0].token_ids != want


def test_unseeded_requests_are_reproducible_from_the_engine_seed(make_engine) -> None:
    def run(seed: int) -> list[list[int]]:
        engine = make_engine(seed=seed)
        for i in range(3):
            engine.add_request(f"u{i}", [1, 50 + i, 60], SamplingParams(temperature=1.0, max_tokens=8))
        done = run_to_completion(engine)
        return [done[f"u{i}"].outputs[0].token_ids for i in range(3)]

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_n_samples_share_the_prompt_blocks(make_engine, tiny_model) -> None:
    prompt = random_prompts(1, 37, 37, seed=6)[0]
    engine = make_engine(block_size=8)
    engine.add_request("g", prompt, SamplingParams(n=3, temperature=0.0, max_tokens=6))
    engine.add_request("r", prompt, SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=6))
    shared_seen = []

    def check(e) -> None:
        seqs = [s for s in e.scheduler.running if s.request_id == "r"]
        if len(seqs) == 4:
            tables = [s.block_table[:4] for s in seqs]  # 37 prompt tokens = 4 full blocks of 8
            shared_seen.append(all(t == tables[0] for t in tables))

    done = run_to_completion(engine, check)
    greedy = greedy_reference(tiny_model, prompt, 6)
    assert [o.index for o in done["g"].outputs] == [0, 1, 2]
    assert all(o.token_ids == greedy for o in done["g"].outputs)
    samples = [tuple(o.token_ids) for o in done["r"].outputs]
    assert len(samples) == 4 and len(set(samples)) > 1, "different samples should differ"
    assert shared_seen and all(shared_seen)
    # The prompt is prefilled once per request; each of the 2 + 3 forked samples recomputes only the partial
    # last prompt block (37 - 32 = 5 tokens) plus its own first token.
    assert engine.get_stats().num_prompt_tokens == 2 * len(prompt) + 5 * (len(prompt) - 32 + 1)


class ForcedSequenceGuide:
    """A fake TokenGuide allowing exactly one token at a time from a fixed list, then finishing."""

    def __init__(self, tokens: list[int], vocab: int) -> None:
        self.tokens, self.vocab, self.pos = tokens, vocab, 0
        self.filled = 0

    def fill_bitmask(self, bitmask_row: torch.Tensor) -> None:
        assert bitmask_row.shape == (bitmask_words(self.vocab),) and bitmask_row.dtype == torch.int32
        bitmask_row.zero_()
        tok = self.tokens[self.pos]
        word = 1 << (tok % 32)
        bitmask_row[tok // 32] = word - (1 << 32) if word >= 1 << 31 else word  # as a signed int32
        self.filled += 1

    def accept_token(self, token_id: int) -> None:
        assert token_id == self.tokens[self.pos], "the engine sampled a token the mask forbade"
        self.pos += 1

    def is_finished(self) -> bool:
        return self.pos == len(self.tokens)

    def copy(self) -> ForcedSequenceGuide:
        clone = ForcedSequenceGuide(self.tokens, self.vocab)
        clone.pos = self.pos
        return clone


def test_guided_decoding_follows_the_guide_and_stops_when_it_finishes(make_engine, tiny_model) -> None:
    forced = [31, 5000, 32767, 7]  # includes bit 31 of a word and the last vocabulary id
    vocab = tiny_model.args.vocab_size
    guide = ForcedSequenceGuide(forced, vocab)
    engine = make_engine()
    engine.add_request("g", [1, 2, 3], SamplingParams(temperature=1.0, max_tokens=20, guide=guide))
    engine.add_request("free", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=6))
    engine.add_request("n2", [1, 2, 3], SamplingParams(n=2, temperature=0.0, max_tokens=20,
                                                       guide=ForcedSequenceGuide(forced, vocab)))
    done = run_to_completion(engine)
    out = done["g"].outputs[0]
    assert out.token_ids == forced and out.finish_reason == "stop"
    assert guide.filled == len(forced) and guide.is_finished()
    assert done["free"].outputs[0].token_ids == greedy_reference(tiny_model, [1, 2, 3], 6)
    assert [o.token_ids for o in done["n2"].outputs] == [forced, forced]


def test_logprobs_match_the_dense_model(make_engine, tiny_model) -> None:
    prompt = [1, 400, 401, 402, 403, 404]
    engine = make_engine()
    engine.add_request("l", prompt, SamplingParams(temperature=0.0, max_tokens=5, logprobs=2, prompt_logprobs=1))
    out = run_to_completion(engine)["l"]
    toks = out.outputs[0].token_ids
    with torch.no_grad():
        lp = torch.log_softmax(tiny_model(torch.tensor([prompt + toks]))[0].float(), -1)  # [T, V]
    for i, (tok, entry) in enumerate(zip(toks, out.outputs[0].logprobs, strict=True)):
        row = lp[len(prompt) - 1 + i]
        assert set(entry) == set(row.topk(2).indices.tolist()) | {tok}
        assert entry[tok] == pytest.approx(row[tok].item(), abs=1e-4)
    assert out.outputs[0].cumulative_logprob == pytest.approx(
        sum(lp[len(prompt) - 1 + i, t].item() for i, t in enumerate(toks)), abs=1e-3
    )
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for i in range(1, len(prompt)):
        assert out.prompt_logprobs[i][prompt[i]] == pytest.approx(lp[i - 1, prompt[i]].item(), abs=1e-4)


def test_requests_that_can_never_fit_are_refused_naming_the_numbers(make_engine) -> None:
    engine = make_engine(max_model_len=64, num_kv_blocks=3, block_size=16)
    with pytest.raises(RequestTooLongError, match=r"60 tokens\) \+ max_tokens \(10\) = 70 .*max_model_len=64"):
        engine.add_request("a", list(range(10, 70)), SamplingParams(max_tokens=10))
    with pytest.raises(RequestTooLongError, match=r"48 tokens in 3 blocks"):
        engine.add_request("b", list(range(10, 50)), SamplingParams(max_tokens=10))
    with pytest.raises(RequestTooLongError, match="max_model_len is 64"):
        engine.add_request("c", list(range(10, 74)), SamplingParams(max_tokens=None))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request("d", [1, 10**6], SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("e", [], SamplingParams())
    engine.add_request("ok", [1, 2], SamplingParams(max_tokens=None, temperature=0.0))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("ok", [1, 2], SamplingParams())
    done = run_to_completion(engine)
    # max_tokens=None runs up to what the 48-token KV cache holds.
    assert len(done["ok"].outputs[0].token_ids) == 46 and done["ok"].outputs[0].finish_reason == "length"


def test_expert_counts_accumulate_every_routed_token(make_engine, tiny_model) -> None:
    engine = make_engine()
    engine.add_request("x", [1, 2, 3, 4], SamplingParams(temperature=0.0, max_tokens=3))
    run_to_completion(engine)
    counts = engine.expert_counts()
    args = tiny_model.args
    assert counts.shape == (args.n_layers, args.num_experts)
    # 4 prompt tokens + 2 decoded tokens fed back, each routed to top-k experts in every layer.
    assert counts.sum(dim=1).tolist() == [6 * args.num_experts_per_tok] * args.n_layers
