"""The batched sampler: logits of R rows -> one token per row, on the logits' device.

Every setting of ``SamplingParams`` becomes a per-row tensor, so one set of tensor ops serves a batch
mixing greedy and random rows, different temperatures, filters, penalties and guides. The only host
transfer is fetching the results once per step.

Randomness is counter-based: a row's noise is a hash of (its request's seed, how many tokens it has
generated, the vocabulary index). A seeded request therefore draws the same tokens whatever else is in
the batch, and again after being preempted and recomputed. Sampling is the exponential race: with
q ~ Exp(1) per token, ``argmax(p / q)`` is distributed as ``p`` (the Gumbel-max trick in another form).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixtral.guide import apply_bitmask
from mixtral.sampling import SamplingParams

_M32 = 0xFFFFFFFF


@dataclass
class SampleRow:
    """What the sampler needs to know about one row of logits."""

    params: SamplingParams
    seed: int
    step: int  # tokens this sample has generated so far (the noise counter)
    prompt_token_ids: list[int]
    output_token_ids: list[int]


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float]  # logprob of each sampled token under the raw distribution
    top_logprobs: list[dict[int, float] | None]  # per row when its params ask for logprobs


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash on int64 tensors holding values in [0, 2^32). Multipliers < 2^31 keep the
    products below 2^63, so no signed overflow happens on any device."""
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _M32
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _M32
    return x ^ (x >> 16)


def _mix32_fast(x: torch.Tensor) -> torch.Tensor:
    """One multiply-xorshift round: enough to decorrelate rows once both inputs are already well mixed."""
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _M32
    return x ^ (x >> 12)


def _column_keys(vocab_size: int, device: torch.device) -> torch.Tensor:
    """Per-vocabulary-index hash [V] (int64, 32 significant bits)."""
    return _mix32(torch.arange(vocab_size, device=device, dtype=torch.int64) ^ 0x6A09E667)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int,
                  column_keys: torch.Tensor | None = None) -> torch.Tensor:
    """seeds, steps [R] int64 -> uniforms in (0, 1) [R, V] float32, a pure function of (seed, step, index).

    ``column_keys`` is ``_column_keys(V)``, passed in by callers that cache it.
    """
    seed_lo, seed_hi = seeds & _M32, (seeds >> 32) & _M32
    row = _mix32(_mix32(seed_lo) ^ seed_hi)
    row = _mix32(row ^ ((steps * 0x2545F491) & _M32))  # [R]
    col = column_keys if column_keys is not None else _column_keys(vocab_size, seeds.device)  # [V]
    bits = _mix32_fast(row[:, None] ^ col[None, :])  # [R, V]
    # 23 random bits shifted by half a step: neither 0 nor 1 occurs. (24 bits would not do: the top value
    # (2^24 - 0.5) / 2^24 rounds to exactly 1.0 in float32, giving -log(1) = 0 noise and a NaN ratio.)
    return ((bits >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


class Sampler:
    def __init__(self, vocab_size: int, eos_id: int | None = None) -> None:
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self._column_keys: dict[torch.device, torch.Tensor] = {}

    def __call__(self, logits: torch.Tensor, rows: list[SampleRow], bitmask: torch.Tensor | None = None
                 ) -> SamplerOutput:
        """logits [R, V] (any float dtype); bitmask int32 [R, W] (all ones for unguided rows) or None."""
        device = logits.device
        logits = logits.float()
        params = [r.params for r in rows]
        raw_logprobs = torch.log_softmax(logits, dim=-1)  # [R, V]

        logits = self._apply_penalties(logits, rows)
        logits = self._apply_min_tokens(logits, rows)
        if bitmask is not None:
            logits = apply_bitmask(logits, bitmask.to(device, non_blocking=True))

        token_ids = logits.argmax(dim=-1)  # [R] greedy choice
        if not all(p.greedy for p in params):
            token_ids = torch.where(
                torch.tensor([p.greedy for p in params], device=device), token_ids, self._sample(logits, rows)
            )

        sampled_lp = raw_logprobs.gather(1, token_ids[:, None]).squeeze(1)  # [R]
        ids_host = token_ids.tolist()  # the one sync of the step
        lp_host = sampled_lp.tolist()
        top: list[dict[int, float] | None] = [None] * len(rows)
        want = [p.logprobs for p in params]
        if any(k is not None for k in want):
            k_max = max(k for k in want if k is not None)
            if k_max > 0:
                vals, idx = torch.topk(raw_logprobs, k_max, dim=-1)  # [R, k_max]
                vals_l, idx_l = vals.tolist(), idx.tolist()
            for r, k in enumerate(want):
                if k is None:
                    continue
                entry = {idx_l[r][j]: vals_l[r][j] for j in range(k)} if k else {}
                entry[ids_host[r]] = lp_host[r]
                top[r] = entry
        return SamplerOutput(ids_host, lp_host, top)

    # ----------------------------------------------------------------- pieces
    def _apply_penalties(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        if not any(r.params.has_penalties for r in rows):
            return logits
        device, v = logits.device, self.vocab_size
        out_counts = _token_counts([r.output_token_ids for r in rows], v, device)  # [R, V]
        seen_prompt = _token_counts([r.prompt_token_ids for r in rows], v, device) > 0
        rep = torch.tensor([r.params.repetition_penalty for r in rows], device=device)[:, None]  # [R, 1]
        freq = torch.tensor([r.params.frequency_penalty for r in rows], device=device)[:, None]
        pres = torch.tensor([r.params.presence_penalty for r in rows], device=device)[:, None]
        seen = seen_prompt | (out_counts > 0)
        # Repetition penalty (CTRL): shrink seen tokens' logits towards "less likely" whatever their sign.
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalized, logits)
        return logits - freq * out_counts - pres * (out_counts > 0).float()

    def _apply_min_tokens(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        """Forbid EOS and stop tokens for rows that have not reached min_tokens yet."""
        banned_rows, banned_ids = [], []
        for i, r in enumerate(rows):
            if r.step < r.params.min_tokens:
                ids = list(r.params.stop_token_ids or [])
                if self.eos_id is not None and not r.params.ignore_eos:
                    ids.append(self.eos_id)
                banned_rows += [i] * len(ids)
                banned_ids += ids
        if not banned_rows:
            return logits
        logits = logits.clone()
        logits[torch.tensor(banned_rows, device=logits.device), torch.tensor(banned_ids, device=logits.device)] = (
            float("-inf")
        )
        return logits

    def _sample(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        """Temperature, top-k, top-p, min-p, then the exponential race. Returns [R] token ids."""
        device = logits.device
        params = [r.params for r in rows]
        temp = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=device)
        probs = torch.softmax(logits / temp[:, None], dim=-1)  # [R, V]

        if any(p.effective_top_k > 0 or p.top_p < 1.0 for p in params):
            sorted_p, order = probs.sort(dim=-1, descending=True)  # [R, V]
            rank = torch.arange(probs.shape[-1], device=device)[None, :]
            k = torch.tensor([p.effective_top_k or probs.shape[-1] for p in params], device=device)[:, None]
            top_p = torch.tensor([p.top_p for p in params], device=device)[:, None]
            # Keep a token if the mass strictly before it is below top_p (so the top token always stays).
            before = sorted_p.cumsum(dim=-1) - sorted_p
            drop_sorted = (rank >= k) | (before >= top_p)
            drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
            probs = probs.masked_fill(drop, 0.0)
        if any(p.min_p > 0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=device)[:, None]
            probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)

        seeds = torch.tensor([r.seed for r in rows], device=device, dtype=torch.int64)
        steps = torch.tensor([r.step for r in rows], device=device, dtype=torch.int64)
        col = self._column_keys.get(device)
        if col is None:
            col = self._column_keys[device] = _column_keys(probs.shape[-1], device)
        q = -torch.log(uniform_noise(seeds, steps, probs.shape[-1], col))  # [R, V] ~ Exp(1)
        return (probs / q).argmax(dim=-1)


def _token_counts(token_lists: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[R, V] float counts of each token id in each row's list."""
    longest = max((len(t) for t in token_lists), default=0)
    counts = torch.zeros(len(token_lists), vocab_size + 1, device=device)
    if longest:
        # Pad with an extra id (vocab_size) whose column is dropped.
        padded = torch.tensor([t + [vocab_size] * (longest - len(t)) for t in token_lists], device=device)
        counts.scatter_add_(1, padded, torch.ones(padded.shape, device=device))
    return counts[:, :vocab_size]
