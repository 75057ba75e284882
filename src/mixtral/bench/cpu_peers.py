"""CPU peers for ``mixtral bench throughput``: the same synthetic workload (prompts of token ids, a fixed number
of greedy output tokens, EOS ignored) through llama.cpp and through transformers, on the same weights.

- llama.cpp, via ``llama-cpp-python`` (the ``peers`` extra, built from source) on a GGUF file: its low-level
  API, so ``batch`` sequences decode together in one context (one ``llama_batch`` per step, a sequence id
  each), the way llama.cpp's own server batches its slots; ``batch=1`` is its single-stream speed.
- transformers' ``MixtralForCausalLM`` on the HF checkpoint, ``generate`` greedy over left-padded batches.

Each run reports its prefill and decode seconds and the greedy tokens (so a test can check the peer really
computed the model). What is a peer and what is ours stays separate: nothing here touches the engine. A peer
that is not installed is reported as unavailable, never faked. Not here: the bench CLI wiring and tables.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

T = TypeVar("T")


@dataclass(frozen=True)
class PeerRun:
    """One peer's run of ``len(tokens)`` prompts: wall seconds of prefill (prompt to first token) and decode,
    summed over the batches, and the generated ids per prompt."""

    peer: str
    version: str
    batch: int
    prefill_s: float
    decode_s: float
    tokens: list[list[int]] = field(repr=False)

    @property
    def output_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def output_tok_s(self) -> float:
        """Output tokens per second of the whole run (prefill included), as ``bench throughput`` reports."""
        return self.output_tokens / max(self.prefill_s + self.decode_s, 1e-9)

    @property
    def decode_tok_s(self) -> float:
        """Tokens per second of the decode steps alone (the first token of each prompt comes from prefill)."""
        return (self.output_tokens - len(self.tokens)) / max(self.decode_s, 1e-9)


def peer_version(package: str) -> str | None:
    """The installed version of a peer's package, None when it is not installed."""
    if importlib.util.find_spec(package.replace("-", "_")) is None:
        return None
    dist = {"llama_cpp": "llama-cpp-python"}.get(package, package)
    return importlib.metadata.version(dist)


def _batches(prompts: list[list[int]], batch: int) -> list[list[list[int]]]:
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    return [prompts[i:i + batch] for i in range(0, len(prompts), batch)]


# --------------------------------------------------------------------------- llama.cpp
def run_llama_cpp(gguf: Path, prompts: list[list[int]], output_len: int, batch: int = 1,
                  threads: int | None = None) -> PeerRun:
    """Greedy ``output_len`` tokens for each prompt through llama.cpp on ``gguf``, ``batch`` sequences at once."""
    import llama_cpp as lc

    version = peer_version("llama_cpp") or "?"
    lc.llama_log_set(_quiet_log(lc), ctypes.c_void_p(0))  # llama.cpp logs every tensor to stderr otherwise
    lc.llama_backend_init()
    mparams = lc.llama_model_default_params()
    model = lc.llama_model_load_from_file(str(gguf).encode(), mparams)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {gguf}")
    longest = max(len(p) for p in prompts) + output_len
    cparams = lc.llama_context_default_params()
    cparams.n_seq_max = batch
    cparams.n_ctx = batch * longest
    cparams.n_batch = cparams.n_ubatch = max(batch * longest, 32)
    if threads:
        cparams.n_threads = cparams.n_threads_batch = threads
    ctx = lc.llama_init_from_model(model, cparams)
    if not ctx:
        lc.llama_model_free(model)
        raise RuntimeError(f"llama.cpp could not create a context of {batch} x {longest} tokens")
    vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
    lbatch = lc.llama_batch_init(cparams.n_batch, 0, batch)
    out: list[list[int]] = []
    prefill_s = decode_s = 0.0
    try:
        for group in _batches(prompts, batch):
            lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
            entries = [(tok, pos, s, pos == len(p) - 1) for s, p in enumerate(group) for pos, tok in enumerate(p)]
            t0 = time.perf_counter()
            last = _decode(lc, ctx, lbatch, entries)
            nxt = [_argmax(lc, ctx, last[s], vocab) for s in range(len(group))]
            prefill_s += time.perf_counter() - t0
            gen = [[t] for t in nxt]
            t0 = time.perf_counter()
            for step in range(1, output_len):
                entries = [(gen[s][-1], len(p) + step - 1, s, True) for s, p in enumerate(group)]
                last = _decode(lc, ctx, lbatch, entries)
                for s in range(len(group)):
                    gen[s].append(_argmax(lc, ctx, last[s], vocab))
            decode_s += time.perf_counter() - t0
            out += gen
    finally:
        lc.llama_batch_free(lbatch)
        lc.llama_free(ctx)
        lc.llama_model_free(model)
    return PeerRun("llama.cpp", version, batch, prefill_s, decode_s, out)


_LOG_SINK: list[object] = []  # keeps the ctypes callback alive while llama.cpp holds it


def _quiet_log(lc: object) -> object:
    if not _LOG_SINK:
        _LOG_SINK.append(lc.llama_log_callback(lambda level, text, user_data: None))  # type: ignore[attr-defined]
    return _LOG_SINK[0]


def _decode(lc: object, ctx: object, lbatch: object, entries: list[tuple[int, int, int, bool]]) -> dict[int, int]:
    """One llama_decode of (token, position, sequence, wants logits) entries; -> sequence: its logits row."""
    lbatch.n_tokens = len(entries)  # type: ignore[attr-defined]
    rows = {}
    for i, (tok, pos, seq, logits) in enumerate(entries):
        lbatch.token[i] = tok  # type: ignore[attr-defined]
        lbatch.pos[i] = pos  # type: ignore[attr-defined]
        lbatch.n_seq_id[i] = 1  # type: ignore[attr-defined]
        lbatch.seq_id[i][0] = seq  # type: ignore[attr-defined]
        lbatch.logits[i] = logits  # type: ignore[attr-defined]
        if logits:
            rows[seq] = i
    rc = lc.llama_decode(ctx, lbatch)  # type: ignore[attr-defined]
    if rc != 0:
        raise RuntimeError(f"llama_decode returned {rc}")
    return rows


def _argmax(lc: object, ctx: object, row: int, vocab: int) -> int:
    ptr = lc.llama_get_logits_ith(ctx, row)  # type: ignore[attr-defined]
    logits = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(vocab,))
    return int(logits.argmax())


# --------------------------------------------------------------------------- transformers
class _FirstToken:
    """A ``generate`` streamer noting when the first new token arrives (the first ``put`` is the prompt)."""

    def __init__(self) -> None:
        self.calls = 0
        self.first: float | None = None

    def put(self, value: object) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def run_transformers(folder: Path, prompts: list[list[int]], output_len: int, batch: int = 1,
                     dtype: str = "bfloat16", threads: int | None = None) -> PeerRun:
    """Greedy ``output_len`` tokens for each prompt through transformers' MixtralForCausalLM on CPU."""
    import torch
    from transformers import MixtralForCausalLM

    if threads:
        torch.set_num_threads(threads)
    model = _quiet_load(lambda: MixtralForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval())
    out: list[list[int]] = []
    prefill_s = decode_s = 0.0
    for group in _batches(prompts, batch):
        width = max(len(p) for p in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for i, p in enumerate(group):  # left padding: every prompt ends at the last column
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        streamer = _FirstToken()
        t0 = time.perf_counter()
        with torch.inference_mode():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=output_len,
                                 min_new_tokens=output_len, do_sample=False, pad_token_id=0, streamer=streamer)
        end = time.perf_counter()
        first = streamer.first or end
        prefill_s += first - t0
        decode_s += end - first
        out += gen[:, width:].tolist()
    import transformers

    return PeerRun("transformers", transformers.__version__, batch, prefill_s, decode_s, out)


def _quiet_load(load: Callable[[], T]) -> T:
    """``load()`` without transformers' per-load progress bar (a benchmark loads the model for every run)."""
    from transformers.utils import logging

    was_on = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        return load()
    finally:
        if was_on:
            logging.enable_progress_bar()
