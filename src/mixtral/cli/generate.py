"""``mixtral generate PROMPT``: complete one prompt and stream the text to stdout as it is produced.

Also holds what ``mixtral chat`` shares with it: the model/device/sampling flags, building the ``LLM`` and
``SamplingParams`` from them, and streaming one request's text. The generation itself is ``mixtral.LLM``'s.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

from mixtral.cli.kernel_args import add_kernel_args, kernel_config_from_args
from mixtral.cli.kv_args import add_kv_cache_args, kv_cache_kwargs
from mixtral.cli.parallel_args import add_parallel_args, parallel_engine_kwargs
from mixtral.cli.quant_args import add_quantization_arg, quantization_kwargs
from mixtral.defaults import DEFAULT_MODEL

if TYPE_CHECKING:
    from mixtral.sampling import SamplingParams


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--model, --device, --dtype, --max-model-len: which model to load and where; and the kernel flags."""
    p.add_argument(
        "--model", "-m", default=DEFAULT_MODEL, metavar="MODEL",
        help=f"model folder (Hugging Face or Mistral format), preset name (random weights, e.g. 'tiny'), "
             f"Hugging Face repo id, or 'demo' (default: {DEFAULT_MODEL})",
    )
    p.add_argument("--device", default=None, metavar="DEVICE",
                   help="torch device to run on, e.g. 'cuda', 'cuda:1', 'cpu' (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "fp32", "bfloat16", "bf16", "float16", "fp16"],
                   help="weight and activation dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--max-model-len", type=int, default=None, metavar="N",
                   help="longest prompt + reply in tokens (default: the model's context length, as the KV cache "
                        "allows); lower it when the KV cache does not fit")
    add_quantization_arg(p)
    add_kv_cache_args(p)
    add_kernel_args(p)
    add_parallel_args(p)


def add_sampling_arguments(p: argparse.ArgumentParser, max_tokens: int) -> None:
    """--max-tokens, --temperature, --top-p, --top-k, --seed, --stop (defaults: ``mixtral.sampling``'s, except the
    reply length, which is each command's)."""
    from mixtral.sampling import DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P

    p.add_argument("--max-tokens", "-n", type=int, default=max_tokens, metavar="N",
                   help=f"most tokens to generate per reply (default: {max_tokens})")
    p.add_argument("--temperature", "-t", type=float, default=DEFAULT_TEMPERATURE, metavar="T",
                   help="sampling temperature; 0 is greedy (always the most likely token) "
                        f"(default: {DEFAULT_TEMPERATURE})")
    p.add_argument("--top-p", type=float, default=DEFAULT_TOP_P, metavar="P",
                   help="nucleus sampling: sample from the smallest set of tokens whose probability reaches P "
                        f"(default: {DEFAULT_TOP_P}, off)")
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, metavar="K",
                   help=f"sample only from the K most likely tokens (default: {DEFAULT_TOP_K}, off)")
    p.add_argument("--seed", type=int, default=None, metavar="S",
                   help="random seed: the same seed, prompt and settings give the same output (default: random)")
    p.add_argument("--stop", action="append", default=None, metavar="STRING",
                   help="stop when this string is generated (not printed); repeat the flag for several")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "generate",
        help="complete a prompt, streaming the text",
        description="Complete PROMPT with the model and stream the generated text to stdout as it is produced. "
                    "The prompt is raw text (no chat template; use `mixtral chat` for that), preceded by <s>. "
                    "Generation ends at the end-of-sequence token, a --stop string, or --max-tokens.",
    )
    p.add_argument("prompt", metavar="PROMPT", help="the text to complete; '-' reads it from stdin")
    add_model_arguments(p)
    add_sampling_arguments(p, max_tokens=128)
    return p


def build_llm(args: argparse.Namespace) -> Any:
    """The ``mixtral.LLM`` the flags name."""
    from mixtral import LLM

    max_model_len = getattr(args, "max_model_len", None)
    engine_kwargs: dict[str, Any] = {"kernels": kernel_config_from_args(args), **kv_cache_kwargs(args)}
    if max_model_len is not None:
        engine_kwargs["max_model_len"] = max_model_len
    engine_kwargs.update(parallel_engine_kwargs(args), **quantization_kwargs(args))
    return LLM(args.model, device=args.device, dtype=args.dtype, **engine_kwargs)


def check_device(device: str | None) -> None:
    """Refuse a CUDA device on a machine without one with a ValueError that says so (torch would raise a bare
    AssertionError from deep inside the load)."""
    if not device:
        return
    import torch

    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        why = "no CUDA GPU is visible" if torch.backends.cuda.is_built() else "this torch is built without CUDA"
        raise ValueError(f"--device {device}: {why}; use --device cpu")


def load_or_report(args: argparse.Namespace, command: str) -> Any | None:
    """``build_llm``, turning a model that cannot be loaded (bad name, broken checkpoint, bad device) into one
    line on stderr instead of a traceback; None then."""
    try:
        check_device(args.device)
        return build_llm(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:  # CheckpointError/ConfigError are ValueErrors
        print(f"mixtral {command}: cannot load model {args.model!r}: {exc}", file=sys.stderr)
        return None


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """SamplingParams from the sampling flags (it validates them and names a bad value)."""
    from mixtral import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_tokens=args.max_tokens, seed=args.seed, stop=args.stop or [])


def stream_text(llm: Any, prompt: str | Sequence[int], params: SamplingParams, out: TextIO,
                strip_leading_space: bool = False) -> tuple[str, str | None]:
    """Run one request, writing each new piece of text to ``out`` as it arrives.

    Returns (the whole text, finish reason). Outputs are cumulative, so each write is the part of the text
    not written yet. ``strip_leading_space`` drops one leading space: a chat reply's first token carries
    SentencePiece's word-start space after ``[/INST]``, which is not part of the message.
    """
    text, finish_reason = "", None
    for output in llm.stream(prompt, params):
        completion = output.outputs[0]
        current = completion.text
        if strip_leading_space and current.startswith(" "):
            current = current[1:]
        if len(current) > len(text):
            out.write(current[len(text):])
            out.flush()
            text = current
        finish_reason = completion.finish_reason
    return text, finish_reason


def read_stdin(stream: TextIO, line: bool = False) -> str:
    """All of ``stream`` (or one line, with its newline; "" at end of input) as text.

    Bytes that are not UTF-8 become U+FFFD instead of failing: a text stream's strict decoding would raise,
    and under a C locale its ``surrogateescape`` strings would reach the tokenizer. Streams without a byte
    buffer (a ``StringIO``) are read as they are.
    """
    buffer = getattr(stream, "buffer", None)
    if buffer is None:
        return stream.readline() if line else stream.read()
    data = buffer.readline() if line else buffer.read()
    return data.decode("utf-8", errors="replace")


def run(args: argparse.Namespace) -> int:
    prompt = read_stdin(sys.stdin) if args.prompt == "-" else args.prompt
    try:
        params = sampling_params(args)
    except ValueError as exc:
        print(f"mixtral generate: {exc}", file=sys.stderr)
        return 2
    llm = load_or_report(args, "generate")
    if llm is None:
        return 1
    try:
        text, _ = stream_text(llm, prompt, params, sys.stdout)
    except ValueError as exc:  # e.g. a prompt longer than the model's context
        print(f"\nmixtral generate: {exc}", file=sys.stderr)
        return 1
    if not text.endswith("\n"):
        sys.stdout.write("\n")  # leave the shell prompt on its own line
    sys.stdout.flush()
    return 0
