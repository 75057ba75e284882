"""``mixtral.LLM``: offline generation on the engine, vLLM's ``LLM`` shape.

    llm = LLM("mixtral-8x7b-folder", dtype="bf16")
    outs = llm.generate(["Hello", "The capital of France is"], SamplingParams(max_tokens=32))
    print(outs[0].outputs[0].text)

All prompts go to one ``LLMEngine`` at once, so they are batched continuously. ``stream`` yields the
cumulative output of one request as its tokens arrive (what the CLI prints from).
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from mixtral.engine.llm_engine import LLMEngine
from mixtral.engine.outputs import RequestOutput
from mixtral.model.mixtral import Transformer
from mixtral.sampling import SamplingParams

Prompt = str | list[int]
Messages = list[dict[str, Any]]


class LLM:
    def __init__(self, model: str | Transformer | None = None, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | str | None = None, **engine_kwargs: Any) -> None:
        """``model``: a folder, a preset name, "demo", a Hugging Face repo id, None (the default model) or a
        built ``Transformer``. ``engine_kwargs`` go to ``EngineConfig`` (max_model_len, max_num_seqs,
        max_num_batched_tokens, kv_cache_bytes, gpu_memory_utilization, enable_prefix_caching, kv_cache_dtype
        ("auto" or "fp8"), seed, ...)
        plus ``tokenizer`` to override the model's."""
        self.llm_engine = LLMEngine.from_config(model, device=device, dtype=dtype, **engine_kwargs)
        self.tokenizer = self.llm_engine.tokenizer
        self._ids = itertools.count()
        # Streams share the engine: a stream's output produced by another caller's step (another stream, or
        # generate) waits here, latest only (outputs are cumulative), until that stream asks.
        self._streaming: set[str] = set()
        self._mailbox: dict[str, RequestOutput] = {}

    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams |
                 Sequence[SamplingParams] | None = None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for one prompt or many (text or token ids); outputs come back in the prompts' order."""
        prompt_list = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompt_list))
        ids = []
        try:
            for prompt, p in zip(prompt_list, params, strict=False):
                rid = f"llm-{next(self._ids)}"
                self.llm_engine.add_request(rid, prompt, p)
                ids.append(rid)
            finished = self._run(ids, use_tqdm)
        except BaseException:
            self.llm_engine.abort_request(ids)
            raise
        return [finished[rid] for rid in ids]

    def chat(self, messages: Messages | Sequence[Messages], sampling_params: SamplingParams |
             Sequence[SamplingParams] | None = None, tools: list[dict[str, Any]] | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate the assistant's reply to one conversation or a list of them (mistral-common encoding).

        Each output's ``prompt`` is the rendered chat prompt the model saw, control tokens shown
        (``"<s>[INST] Hi[/INST]"``), as vLLM's ``LLM.chat`` returns its templated prompt string."""
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer; this engine has none")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.tokenizer.encode_chat(list(conv), tools) for conv in conversations]  # type: ignore[arg-type]
        outputs = self.generate(prompts, sampling_params, use_tqdm)
        # The engine got token ids, so it knows no prompt text; the ids decode back to the rendered template.
        for out in outputs:
            out.prompt = self.tokenizer.decode(out.prompt_token_ids, skip_special=False)
        return outputs

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Run one request, yielding its cumulative output after every step that advanced it."""
        rid = f"llm-{next(self._ids)}"
        engine = self.llm_engine
        engine.add_request(rid, prompt, sampling_params)
        self._streaming.add(rid)
        done = False
        try:
            while not done:
                mine = self._mailbox.pop(rid, None)
                if mine is None:
                    if not engine.has_unfinished_requests():
                        break
                    for out in engine.step():
                        if out.request_id == rid:
                            mine = out
                        elif out.request_id in self._streaming:
                            self._mailbox[out.request_id] = out
                    if mine is None:
                        continue
                done = mine.finished
                yield mine
        finally:
            self._streaming.discard(rid)
            self._mailbox.pop(rid, None)
            if not done:
                engine.abort_request(rid)

    def _run(self, ids: list[str], use_tqdm: bool) -> dict[str, RequestOutput]:
        engine = self.llm_engine
        wanted = set(ids)
        finished: dict[str, RequestOutput] = {}
        progress = _progress(len(ids)) if use_tqdm and sys.stderr.isatty() else None
        try:
            while len(finished) < len(ids) and engine.has_unfinished_requests():
                for out in engine.step(finished_only=True):
                    if out.finished and out.request_id in wanted:
                        finished[out.request_id] = out
                        if progress is not None:
                            progress[0].advance(progress[1])
                    elif out.request_id in self._streaming:  # an open stream's request finished meanwhile
                        self._mailbox[out.request_id] = out
        finally:
            if progress is not None:
                progress[0].stop()
        return finished


def _progress(total: int) -> tuple[Any, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        transient=True)
    progress.start()
    return progress, progress.add_task("generate", total=total)


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # type: ignore[list-item]  # one prompt of token ids
    for i, p in enumerate(prompts):
        if not isinstance(p, str) and not (isinstance(p, list) and all(isinstance(t, int) for t in p)):
            raise TypeError(f"prompts[{i}] must be a string or a list of token ids, got {type(p).__name__}")
    return prompts  # type: ignore[return-value]


def _as_params_list(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(n)]
    if isinstance(params, SamplingParams):
        # A guide holds one sequence's state: each prompt gets its own copy.
        return [params.clone() if params.guide is not None and i else params for i in range(n)]
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} SamplingParams for {n} prompts; give one, or one per prompt")
    return params
