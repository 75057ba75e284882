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

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mixtral.engine.host_tensors import host_tensor
from mixtral.guide import apply_bitmask
from mixtral.sampling import SamplingParams

_M32 = 0xFFFFFFFF


@dataclass
class SampleRow:
    """What the sampler needs to know about one row of logits."""

    params: SamplingParams
    seed: int
    step: int  # tokens this sample has generated so far (the noise counter)
    # Read only by the penalties; the engine fills them only for rows whose params have penalties.
    prompt_token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)


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


ToDevice = Callable[[str, torch.Tensor], torch.Tensor]


def _plain_to_device(device: torch.device) -> ToDevice:
    return lambda _name, host: host.to(device)


@dataclass
class SamplingTensors:
    """The per-row settings of one step on the device, built before the forward pass is launched (so their
    host-to-device copies overlap it). Flags are host bools: whole stages are skipped when no row needs them."""

    all_greedy: bool
    use_top_k_p: bool
    use_min_p: bool
    # Read only by random sampling: None when every row is greedy (argmax needs none of them).
    greedy: torch.Tensor | None = None  # [R] bool
    temperature: torch.Tensor | None = None  # [R] f32 (1 for greedy rows)
    top_k: torch.Tensor | None = None  # [R] int64 (V = off)
    top_p: torch.Tensor | None = None  # [R] f32
    min_p: torch.Tensor | None = None  # [R] f32
    seeds: torch.Tensor | None = None  # [R] int64
    steps: torch.Tensor | None = None  # [R] int64
    # Penalties (None when no row has any).
    penalties: torch.Tensor | None = None  # [3, R] f32: repetition, frequency, presence
    output_counts: torch.Tensor | None = None  # [R, V] f32
    prompt_seen: torch.Tensor | None = None  # [R, V] bool
    # min_tokens: (row index [B], token id [B]) pairs to forbid.
    banned: tuple[torch.Tensor, torch.Tensor] | None = None
    # logit_bias: (row index [B], token id [B]) pairs and their biases [B] f32.
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


class Sampler:
    def __init__(self, vocab_size: int, eos_id: int | None = None) -> None:
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self._column_keys: dict[torch.device, torch.Tensor] = {}

    def prepare(self, rows: list[SampleRow], device: torch.device, to_device: ToDevice | None = None
                ) -> SamplingTensors:
        """Build the step's SamplingTensors. ``to_device(name, host_tensor)`` copies into a persistent buffer
        (the model runner's pinned staging path); by default a plain ``.to(device)``."""
        put = to_device or _plain_to_device(device)
        params = [r.params for r in rows]
        v = self.vocab_size
        n = len(rows)
        # A few list passes and one tensor per dtype: this runs for every row of every step (host_tensors.py).
        top_p = [p.top_p for p in params]
        min_p = [p.min_p for p in params]
        top_k = [p.top_k for p in params]
        all_greedy = all(p.greedy for p in params)
        out = SamplingTensors(all_greedy=all_greedy,
                              use_top_k_p=max(top_k, default=0) > 0 or min(top_p, default=1.0) < 1.0,
                              use_min_p=max(min_p, default=0.0) > 0)
        if not all_greedy:  # an all-greedy step (argmax) needs none of the per-row settings: no copies
            temperature = [p.temperature if p.temperature > 0 else 1.0 for p in params]
            floats = host_tensor(temperature + top_p + min_p, torch.float32)  # [3R]
            # top_k >= V keeps every token, like "off" (-1 and 0 too); an unbounded one would not fit int64.
            top_k = [min(k, v) if k > 0 else v for k in top_k]
            ints = host_tensor(top_k + [r.seed for r in rows] + [r.step for r in rows]
                               + [p.greedy for p in params])  # [4R]
            floats_d = put("sampling_floats", floats).view(3, n)
            ints_d = put("sampling_ints", ints).view(4, n)
            out.greedy, out.temperature, out.top_p, out.min_p = ints_d[3].bool(), floats_d[0], floats_d[1], floats_d[2]
            out.top_k, out.seeds, out.steps = ints_d[0], ints_d[1], ints_d[2]
        if any(p.has_penalties for p in params):
            pen = torch.tensor([[p.repetition_penalty for p in params], [p.frequency_penalty for p in params],
                                [p.presence_penalty for p in params]], dtype=torch.float32)  # [3, R]
            out.penalties = put("sampling_penalties", pen.flatten()).view(3, n)
            out.output_counts = _token_counts([r.output_token_ids for r in rows], v, device, put, "out")
            out.prompt_seen = _token_counts([r.prompt_token_ids for r in rows], v, device, put, "prompt") > 0
        banned_rows: list[int] = []
        banned_ids: list[int] = []
        for i in [i for i, r in enumerate(rows) if r.step < r.params.min_tokens]:
            p = params[i]
            ids = list(p.stop_token_ids or [])
            if self.eos_id is not None and not p.ignore_eos:
                ids.append(self.eos_id)
            banned_rows += [i] * len(ids)
            banned_ids += ids
        if banned_rows:
            out.banned = (put("banned_rows", host_tensor(banned_rows)), put("banned_ids", host_tensor(banned_ids)))
        biased = [(i, t, b) for i in [i for i, p in enumerate(params) if p.logit_bias]
                  for t, b in params[i].logit_bias.items()]  # type: ignore[union-attr]
        if biased:
            rows_b, ids_b, vals_b = zip(*biased, strict=True)
            out.bias = (put("bias_rows", host_tensor(rows_b)), put("bias_ids", host_tensor(ids_b)),
                        put("bias_values", host_tensor(vals_b, torch.float32)))
        return out

    def sample(self, logits: torch.Tensor, rows: list[SampleRow], bitmask: torch.Tensor | None = None,
               tensors: SamplingTensors | None = None) -> SampledBatch:
        """logits [R, V] (any float dtype); bitmask int32 [R, W] (all ones for unguided rows) or None;
        ``tensors`` from ``prepare`` (built here when not given). Returns without waiting for the device: the
        sampled ids stay on it (the next step may read them) and their copy to the host is in flight."""
        device = logits.device
        t = tensors if tensors is not None else self.prepare(rows, device)
        logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1)  # [R, V]

        if t.penalties is not None:
            logits = self._apply_penalties(logits, t)
        if t.bias is not None:
            logits = logits.index_put(t.bias[:2], t.bias[2], accumulate=True)
        if bitmask is not None:
            logits = apply_bitmask(logits, bitmask.to(device, non_blocking=True))
        if t.banned is not None:
            # A fill, not torch.tensor(..., device): that copy from the host would wait for the running step.
            banned = logits.index_put(t.banned, torch.full((), float("-inf"), device=device))
            if bitmask is not None:
                # A guide whose grammar is complete allows only EOS, which min_tokens bans: the row would have
                # no token left (argmax of all -inf is token 0). The guide wins: such rows keep its choices.
                dead = torch.isneginf(banned).all(dim=-1, keepdim=True)  # [R, 1]
                banned = torch.where(dead, logits, banned)
            logits = banned

        token_ids = logits.argmax(dim=-1)  # [R] greedy choice
        if not t.all_greedy:
            assert t.greedy is not None
            token_ids = torch.where(t.greedy, token_ids, self._sample(logits, t))

        sampled_lp = raw_logprobs.gather(1, token_ids[:, None]).squeeze(1)  # [R]
        want = [r.params.logprobs for r in rows]
        k_max = max((k for k in want if k is not None), default=0)
        parts = [token_ids.double(), sampled_lp.double()]  # ids are exact in float64
        if k_max > 0:
            vals, idx = torch.topk(raw_logprobs, k_max, dim=-1)  # [R, k_max]
            parts += [vals.double().T, idx.double().T]
        packed = torch.cat([p.reshape(-1, len(rows)) for p in parts])  # [2 + 2k, R]
        return SampledBatch(token_ids, to_host_async(packed), want, k_max)

    def __call__(self, logits: torch.Tensor, rows: list[SampleRow], bitmask: torch.Tensor | None = None,
                 tensors: SamplingTensors | None = None) -> SamplerOutput:
        """``sample`` and wait for its results on the host."""
        return self.sample(logits, rows, bitmask, tensors).fetch()

    # ----------------------------------------------------------------- pieces
    @staticmethod
    def _apply_penalties(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
        assert t.penalties is not None and t.output_counts is not None and t.prompt_seen is not None
        rep, freq, pres = (t.penalties[i][:, None] for i in range(3))  # [R, 1] each
        counts = t.output_counts  # [R, V]
        seen = t.prompt_seen | (counts > 0)
        # Repetition penalty (CTRL): shrink seen tokens' logits towards "less likely" whatever their sign.
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalized, logits)
        return logits - freq * counts - pres * (counts > 0).float()

    def _sample(self, logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
        """Temperature, top-k, top-p, min-p, then the exponential race. Returns [R] token ids."""
        assert t.temperature is not None and t.top_k is not None and t.top_p is not None and t.min_p is not None
        assert t.seeds is not None and t.steps is not None
        device = logits.device
        probs = torch.softmax(logits / t.temperature[:, None], dim=-1)  # [R, V]
        if t.use_top_k_p:
            sorted_p, order = probs.sort(dim=-1, descending=True)  # [R, V]
            rank = torch.arange(probs.shape[-1], device=device)[None, :]
            # Keep a token if the mass strictly before it is below top_p (so the top token always stays).
            before = sorted_p.cumsum(dim=-1) - sorted_p
            drop_sorted = (rank >= t.top_k[:, None]) | (before >= t.top_p[:, None])
            drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
            probs = probs.masked_fill(drop, 0.0)
        if t.use_min_p:
            probs = probs.masked_fill(probs < t.min_p[:, None] * probs.amax(dim=-1, keepdim=True), 0.0)
        col = self._column_keys.get(device)
        if col is None:
            col = self._column_keys[device] = _column_keys(probs.shape[-1], device)
        q = -torch.log(uniform_noise(t.seeds, t.steps, probs.shape[-1], col))  # [R, V] ~ Exp(1)
        return (probs / q).argmax(dim=-1)


def to_host_async(t: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start copying ``t`` to (pinned) host memory; returns the host tensor and an event marking the copy done.

    Enqueued right after the sampling kernels, so it waits for this step only: a blocking ``.tolist()`` later
    would also wait for any step launched after this one (the engine overlaps the next step's launch).
    """
    if t.device.type != "cuda":
        return t, None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done


@dataclass
class SampledBatch:
    """One step's samples: ids on the device (``token_ids`` [R] int64) and the host copy in flight."""

    token_ids: torch.Tensor
    host: tuple[torch.Tensor, torch.cuda.Event | None]  # [2 + 2k, R] float64: ids, logprobs, top-k values, ids
    want: list[int | None]  # per row: top logprobs asked for
    k_max: int

    def fetch(self) -> SamplerOutput:
        """Wait for the host copy (this step's work only) and unpack it."""
        packed, done = self.host
        if done is not None:
            done.synchronize()
        rows = packed.numpy().tolist()  # numpy's tolist is ~4x faster than torch's
        ids_host = [int(t) for t in rows[0]]
        lp_host = rows[1]
        top: list[dict[int, float] | None] = [None] * len(ids_host)
        for r, k in enumerate(self.want):
            if k is None:
                continue
            entry = {int(rows[2 + self.k_max + j][r]): rows[2 + j][r] for j in range(k)}
            entry[ids_host[r]] = lp_host[r]
            top[r] = entry
        return SamplerOutput(ids_host, lp_host, top)


def _token_counts(token_lists: list[list[int]], vocab_size: int, device: torch.device, put: ToDevice,
                  name: str) -> torch.Tensor:
    """[R, V] float counts of each token id in each row's list."""
    longest = max((len(t) for t in token_lists), default=0)
    counts = torch.zeros(len(token_lists), vocab_size + 1, device=device)
    if longest:
        # Pad with an extra id (vocab_size) whose column is dropped.
        padded = torch.tensor([t + [vocab_size] * (longest - len(t)) for t in token_lists])  # [R, L]
        padded_d = put(f"counts_{name}", padded.flatten()).view(padded.shape)
        counts.scatter_add_(1, padded_d, torch.ones(padded.shape, device=device))
    return counts[:, :vocab_size]
