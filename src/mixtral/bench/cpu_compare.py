"""``mixtral bench throughput --compare``: this engine on CPU against transformers and llama.cpp, in one run on the
same weights.

From the one model (``--model``: the demo by default, any float HF / Mistral folder or a preset) it writes GGUF
files with our converter (checkpoint/gguf_writer.py: BF16, Q8_0, Q4_0; the embeddings and lm_head stay BF16 in all
three, as our quantized models keep them) and runs the same greedy workload (``--input-len`` random prompt ids,
``--output-len`` tokens each, EOS ignored) through:

- ``bf16``: this engine on the checkpoint in bf16;
- ``int8`` / ``int4``: this engine on the Q8_0 / Q4_0 GGUF file, so the very weights llama.cpp runs (int8 and int4
  with one fp16 scale per 32 weights, symmetric), through the CPU kernel ``--cpu-int-kernel`` picks (quant/int_cpu.py:
  by default the integer-dot kernel (AVX512-VNNI or AVX2 CPUs), int8 activations as llama.cpp's; the title and
  the JSON name the one that ran);
- ``int8-packed`` / ``int4-packed`` (only when named in ``--compare-runs``): the same files through PyTorch's packed
  matmuls (bf16 activations), so one table shows what the native kernel adds;
- ``int8-rtn`` / ``int4-rtn``: ``--quantization int8|int4`` on the bf16 checkpoint, what a user of this engine gets
  without a GGUF file (int8 one scale per channel; int4 groups of 128, or the largest of 64/32/16 that divides
  every width: the JSON's ``weights`` names it; same round to nearest, other groups than Q4_0's 32);
- ``transformers``: ``MixtralForCausalLM`` on the HF checkpoint (``--compare-hf-dtype``), ``generate`` greedy;
- ``llama.cpp``: llama-cpp-python on each GGUF file (a row per file), batched through its own ``llama_batch``.

Two figures per row: batch 1 (one prompt alone: decode tokens/s, the first token excluded) and batched
(``--compare-batch`` prompts at once: output tokens/s of the whole run, prefill included, as ``bench throughput``
reports). Each is the best of ``--compare-repeats`` timed runs after a warm-up; with ``--compare-interleave``
every engine row stays loaded and each of ``--compare-repeats`` rounds runs every row once, each figure the
row's median (on a shared host whose speed drifts between minutes, the fair form: batch-1 ratios to llama.cpp
measured one row after the other moved by up to 0.3 between runs of the same commit). Every row runs with the same
``--threads`` (default: every core). The ratio columns divide by the llama.cpp row of the same weights (bf16 and
transformers by BF16, int8 by Q8_0, int4 by Q4_0). The JSON also holds, per row, how many batch-1 greedy tokens
equal that llama.cpp row's before the first difference (both ran the model; rounding differences make a random
model's greedy paths part somewhere: llama.cpp quantizes activations to 8 bits for its quantized dot products).

Not here: the peers themselves (cpu_peers.py), the GGUF writer, the plain throughput benchmark (throughput.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mixtral.bench.args import positive_int
from mixtral.bench.cpu_peers import PeerRun, peer_version, run_llama_cpp, run_transformers

RUNS = ("bf16", "int8", "int4", "int8-rtn", "int4-rtn", "int8-packed", "int4-packed", "transformers", "llama.cpp")
# The -packed rows (the GGUF files through PyTorch's packed matmuls, whatever --cpu-int-kernel says) show what the
# native kernel adds; asked for by name.
DEFAULT_RUNS = ",".join(r for r in RUNS if not r.endswith("-packed"))
# Our run -> (the GGUF type whose llama.cpp row it is compared with, a description of its weights).
OURS = {
    "bf16": ("bf16", "bf16"),
    "int8": ("q8_0", "Q8_0 file"),
    "int4": ("q4_0", "Q4_0 file"),
    "int8-rtn": ("q8_0", "RTN int8 per channel"),
    "int4-rtn": ("q4_0", "RTN int4 groups"),
    "int8-packed": ("q8_0", "Q8_0 file, packed kernel"),
    "int4-packed": ("q4_0", "Q4_0 file, packed kernel"),
}
GGUF_TYPES = ("bf16", "q8_0", "q4_0")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``--compare`` flag set (``bench throughput`` adds it next to its own flags)."""
    g = p.add_argument_group(
        "CPU comparison (--compare)",
        "Runs this engine (bf16, and int8/int4 on the very Q8_0/Q4_0 GGUF files llama.cpp reads), transformers and "
        "llama.cpp on the same weights, one after the other, and prints one table with the ratios to llama.cpp. "
        "Uses --model, --input-len, --output-len, --threads (default: every core), --seed, --json, "
        "--kernel-backend; the GGUF files are written by `mixtral convert --to gguf`'s code.")
    g.add_argument("--compare", action="store_true",
                   help="run the CPU comparison instead of the throughput benchmark (see the group description)")
    g.add_argument("--compare-runs", type=run_list, default=DEFAULT_RUNS, metavar="LIST",
                   help=f"comma-separated rows, from {', '.join(RUNS)} (default: {DEFAULT_RUNS}); int8/int4 load "
                        "the Q8_0/Q4_0 GGUF, int8-rtn/int4-rtn quantize the bf16 checkpoint while loading, "
                        "int8-packed/int4-packed load the GGUF for PyTorch's packed matmuls instead of the native "
                        "kernel")
    g.add_argument("--compare-batch", type=positive_int, default=16,
                   help="prompts decoded together in the batched figure (default: 16)")
    g.add_argument("--compare-repeats", type=positive_int, default=3,
                   help="timed runs per figure, the best kept (default: 3; the first untimed run warms up)")
    g.add_argument("--compare-interleave", action="store_true",
                   help="load every engine row at once and run --compare-repeats rounds, each running every row "
                        "once; report each row's median (default: one row after the other, each the best of its "
                        "repeats). Fairer on a host whose speed drifts; needs the memory of all engine rows")
    g.add_argument("--compare-hf-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="transformers' dtype (default: bfloat16, the faster of the two on AVX512-BF16 CPUs)")
    g.add_argument("--gguf-dir", type=Path, default=None, metavar="DIR",
                   help="write the GGUF files (model-bf16.gguf, model-q8_0.gguf, model-q4_0.gguf) here and keep "
                        "them (default: a temporary folder, removed afterwards)")


def run_list(text: str) -> str:
    """Comma-separated names from RUNS (argparse type)."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in RUNS]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"must be comma-separated names from {', '.join(RUNS)}, got {text!r}")
    return ",".join(dict.fromkeys(items))


@dataclass
class Row:
    """One line of the table: a run, its weights, both figures, and their ratios to its llama.cpp row."""

    run: str
    weights: str
    version: str
    batch1_decode_tok_s: float
    batched_output_tok_s: float
    batched_decode_tok_s: float
    vs: str | None = None  # the llama.cpp row the ratios divide by
    batch1_ratio: float | None = None
    batched_ratio: float | None = None
    greedy_prefix: int | None = None  # batch-1 greedy tokens equal to the vs row's before the first difference


# ----------------------------------------------------------------------------- our engine
def run_engine(engine: Any, prompts: list[list[int]], output_len: int, batch: int) -> PeerRun:
    """Greedy ``output_len`` tokens per prompt through ``engine``, ``batch`` requests submitted at once: the same
    contract as the peers' runs (prefill = until every request of a group has its first token)."""
    from mixtral.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    tokens: list[list[int]] = []
    prefill_s = decode_s = 0.0
    for start in range(0, len(prompts), batch):
        group = prompts[start:start + batch]
        t0 = time.monotonic()
        ids = [f"compare-{t0}-{i}" for i in range(len(group))]
        for rid, prompt in zip(ids, group, strict=True):
            engine.add_request(rid, prompt, params, arrival_time=t0)
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step(finished_only=True):
                done[out.request_id] = out
        end = time.monotonic()
        first = max(done[r].metrics.first_token_time or end for r in ids)
        prefill_s += first - t0
        decode_s += end - first
        tokens += [list(done[r].outputs[0].token_ids) for r in ids]
    return PeerRun("mixtral", _our_version(), batch, prefill_s, decode_s, tokens)


def _our_version() -> str:
    import importlib.metadata

    commit = _commit()
    return importlib.metadata.version("mixtral") + (f" ({commit})" if commit else "")


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
                             cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return None
    return out or None


# ----------------------------------------------------------------------------- measuring
@dataclass
class Measured:
    batch1: PeerRun
    batched: PeerRun


def best_of(repeats: int, once: Any) -> PeerRun:
    """The fastest of ``repeats`` runs of ``once()`` (by output tokens/s); each run's tokens are the same."""
    runs = [once() for _ in range(repeats)]
    return max(runs, key=lambda r: r.output_tok_s)


def median_of(runs: list[PeerRun]) -> PeerRun:
    """The run of median output tokens/s (the lower middle one of an even count)."""
    return sorted(runs, key=lambda r: r.output_tok_s)[(len(runs) - 1) // 2]


def measure_interleaved(runners: dict[str, Any], prompts: list[list[int]], output_len: int, batch: int,
                        rounds: int) -> dict[str, Measured]:
    """Every runner warmed up, then ``rounds`` rounds that each run every row once (batch 1, then batched); per
    row the median run. A host whose speed drifts (another job, a throttled core) then moves every row alike
    instead of whichever ran during the slow minutes."""
    for runner in runners.values():
        runner(prompts[:1], min(4, output_len), 1)
        runner(prompts[:batch], min(4, output_len), batch)
    ones: dict[str, list[PeerRun]] = {name: [] for name in runners}
    manys: dict[str, list[PeerRun]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            ones[name].append(runner(prompts[:1], output_len, 1))
        for name, runner in runners.items():
            manys[name].append(runner(prompts[:batch], output_len, batch))
    return {name: Measured(median_of(ones[name]), median_of(manys[name])) for name in runners}


def measure(runner: Any, prompts: list[list[int]], output_len: int, batch: int, repeats: int) -> Measured:
    """``runner(prompts, output_len, batch) -> PeerRun``: a short warm-up, then batch 1 on the first prompt and
    ``batch`` prompts at once, each the best of ``repeats``."""
    runner(prompts[:1], min(4, output_len), 1)
    runner(prompts[:batch], min(4, output_len), batch)
    one = best_of(repeats, lambda: runner(prompts[:1], output_len, 1))
    many = best_of(repeats, lambda: runner(prompts[:batch], output_len, batch))
    return Measured(one, many)


def _engine_runner(model: str, args: argparse.Namespace, quantization: str | None, max_len: int,
                   cpu_int_kernel: str | None = None) -> tuple[Any, Any]:
    import dataclasses

    from mixtral.cli.kernel_args import kernel_config_from_args
    from mixtral.engine.llm_engine import LLMEngine

    kernels = kernel_config_from_args(args)
    if cpu_int_kernel is not None:
        kernels = dataclasses.replace(kernels, cpu_int_kernel=cpu_int_kernel)
    # No prefix caching: the repeats reuse their prompts, and llama.cpp's runs start from an empty cache too.
    engine = LLMEngine.from_config(
        model, device="cpu", dtype="bf16", seed=args.seed, max_model_len=max_len, max_num_seqs=args.compare_batch,
        max_num_batched_tokens=max(args.max_num_batched_tokens, max_len), kv_cache_bytes=args.kv_cache_bytes,
        enable_prefix_caching=False, kernels=kernels, quantization=quantization)
    return engine, lambda prompts, n, batch: run_engine(engine, prompts, n, batch)


def hf_folder(model: str, work: Path) -> Path:
    """An HF checkpoint folder of ``model`` for transformers (the model's own folder when it is one, else a
    conversion into ``work``)."""
    from mixtral.checkpoint.loader import resolve
    from mixtral.checkpoint.writer import convert_checkpoint

    source = resolve(model)
    if source.format == "hf" and source.folder is not None and source.repo_id is None:
        return source.folder
    return convert_checkpoint(model, work / "hf", "hf")


def write_ggufs(model: str, folder: Path, types: list[str], seed: int) -> dict[str, Path]:
    """The model as GGUF files of ``types`` in ``folder`` (float tensors bf16), by type."""
    import torch

    from mixtral.checkpoint.gguf_writer import convert_to_gguf

    out = {}
    for t in types:
        path = folder / f"model-{t}.gguf"
        out[t] = convert_to_gguf(model, path, t, dtype=torch.bfloat16, seed=seed, progress=False)
    return out


def run(args: argparse.Namespace) -> int:
    """The comparison; a model that cannot load or a peer that is not installed is one line on stderr, status 2."""
    import random

    import torch

    from mixtral.checkpoint.loader import resolve

    runs = args.compare_runs.split(",")
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    missing = [name for name, pkg in (("transformers", "transformers"), ("llama.cpp", "llama_cpp"))
               if name in runs and peer_version(pkg) is None]
    if missing:
        return _fail(f"{', '.join(missing)} not installed (llama.cpp: pip install 'mixtral[peers]'); leave "
                     f"{' and '.join(missing)} out of --compare-runs")
    try:
        source = resolve(args.model)
    except (ValueError, FileNotFoundError) as exc:
        return _fail(f"cannot load {args.model!r}: {exc}")
    rng = random.Random(args.seed)
    n = args.compare_batch
    prompts = [[rng.randrange(1000, source.args.vocab_size) for _ in range(args.input_len)] for _ in range(n)]
    max_len = args.input_len + args.output_len
    ours = [r for r in runs if r in OURS]
    # The llama.cpp rows are one per GGUF type; our int8 / int4 rows read the Q8_0 / Q4_0 files.
    ggufs_needed = list(GGUF_TYPES) if "llama.cpp" in runs else [
        t for t, r in (("q8_0", "int8"), ("q4_0", "int4")) if r in runs or f"{r}-packed" in runs]
    results: dict[str, Measured] = {}
    with tempfile.TemporaryDirectory(prefix="mixtral-compare-") as tmp:
        work = Path(tmp)
        folder = args.gguf_dir or work
        _note(f"writing GGUF files ({', '.join(ggufs_needed)}) to {folder}")
        try:
            ggufs = write_ggufs(args.model, folder, ggufs_needed, args.seed)
        except (ValueError, FileNotFoundError) as exc:
            return _fail(f"cannot write {args.model!r} as GGUF: {exc}")
        runners: dict[str, Any] = {}  # row -> runner(prompts, out, batch) -> PeerRun
        engines: list[Any] = []
        try:
            for name in ours:
                quant = {"int8-rtn": "int8", "int4-rtn": "int4"}.get(name)
                model = args.model if quant or name == "bf16" else str(ggufs[OURS[name][0]])  # else a GGUF file
                kernel = "packed" if name.endswith("-packed") else None
                try:
                    engine, runner = _engine_runner(model, args, quant, max_len, kernel)
                except (ValueError, FileNotFoundError, RuntimeError) as exc:
                    return _fail(f"cannot load {model!r} ({name}): {exc}")
                if args.compare_interleave:  # measured below, every row in memory
                    engines.append(engine)
                    runners[name] = runner
                    continue
                _note(f"ours {name}")
                try:  # one engine in memory at a time
                    results[name] = measure(runner, prompts, args.output_len, n, args.compare_repeats)
                finally:
                    engine.shutdown()
            if "transformers" in runs:
                folder_hf = hf_folder(args.model, work)

                def hf(prompts: list[list[int]], out: int, batch: int) -> PeerRun:
                    return run_transformers(folder_hf, prompts, out, batch, args.compare_hf_dtype, threads)

                runners["transformers"] = hf
            if "llama.cpp" in runs:
                for t in ggufs_needed:
                    def lc(prompts: list[list[int]], out: int, batch: int, path: Path = ggufs[t]) -> PeerRun:
                        return run_llama_cpp(path, prompts, out, batch, threads)

                    runners[f"llama.cpp {t.upper()}"] = lc
            if args.compare_interleave:
                _note(f"{args.compare_repeats} rounds of {', '.join(runners)}")
                results.update(measure_interleaved(runners, prompts, args.output_len, n, args.compare_repeats))
            else:
                for name, runner in runners.items():
                    _note(name)
                    results[name] = measure(runner, prompts, args.output_len, n, args.compare_repeats)
        finally:
            for engine in engines:
                engine.shutdown()
    versions = {name: m.batch1.version for name, m in results.items()}
    from mixtral.quant.int_method import int4_group_for

    a = source.args
    rows = table_rows(results, versions, args.compare_hf_dtype,
                      {"int4-rtn": f"RTN int4 g{int4_group_for((a.dim, a.hidden_dim, a.q_size))}"})
    stat = f"median of {args.compare_repeats} interleaved rounds" if args.compare_interleave else \
        f"best of {args.compare_repeats}"
    title = (f"CPU comparison: {args.model} ({threads} threads; batch 1 and {n} prompts x {args.input_len} in / "
             f"{args.output_len} out; int kernel {int_kernel(args)}; {stat})")
    print_rows(title, rows, n)
    if args.json is not None:
        record = {"benchmark": "throughput-compare", "results": [asdict(r) for r in rows],
                  "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                             if not k.startswith("_") and not callable(v)},
                  "environment": {**environment(threads), "cpu_int_kernel": int_kernel(args)}}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


def table_rows(results: dict[str, Measured], versions: dict[str, str], hf_dtype: str,
               labels: dict[str, str] | None = None) -> list[Row]:
    """The table's rows in RUNS order then the llama.cpp rows, with ratios to the llama.cpp row of the same
    weights where it was measured. ``labels``: a run's weights column where OURS' default is not precise."""
    rows = []
    for name, m in results.items():
        if name in OURS:
            vs_type, weights = OURS[name][0], (labels or {}).get(name, OURS[name][1])
        elif name == "transformers":
            vs_type, weights = "bf16", hf_dtype
        else:
            vs_type, weights = None, f"{name.split()[1]} file"
        row = Row(name, weights, versions.get(name, "?"),
                  m.batch1.decode_tok_s, m.batched.output_tok_s, m.batched.decode_tok_s)
        peer = results.get(f"llama.cpp {vs_type.upper()}") if vs_type else None
        if peer is not None:
            row.vs = f"llama.cpp {vs_type.upper()}"
            row.batch1_ratio = row.batch1_decode_tok_s / max(peer.batch1.decode_tok_s, 1e-9)
            row.batched_ratio = row.batched_output_tok_s / max(peer.batched.output_tok_s, 1e-9)
            pairs = zip(m.batch1.tokens[0], peer.batch1.tokens[0], strict=False)
            row.greedy_prefix = next((i for i, (a, b) in enumerate(pairs) if a != b), len(peer.batch1.tokens[0]))
        rows.append(row)
    return rows


def print_rows(title: str, rows: list[Row], batch: int) -> None:
    from mixtral.bench.report import print_table

    def ratio(x: float | None) -> str:
        return f"{x:.2f}x" if x is not None else "-"

    header = ("run", "weights", "batch 1 tok/s", "x llama.cpp", f"batch {batch} tok/s", "x llama.cpp")
    print_table(title, [(r.run, r.weights, f"{r.batch1_decode_tok_s:,.1f}", ratio(r.batch1_ratio),
                         f"{r.batched_output_tok_s:,.1f}", ratio(r.batched_ratio)) for r in rows], header=header)


def int_kernel(args: argparse.Namespace) -> str:
    """The CPU kernel our int rows ran on: ``--cpu-int-kernel``, ``auto`` resolved (kernels/cpu_native.py)."""
    choice = getattr(args, "cpu_int_kernel", "auto")
    if choice != "auto":
        return choice
    from mixtral.kernels.cpu_native import native_int_dot

    return "native" if native_int_dot() is not None else "packed"


def environment(threads: int) -> dict[str, Any]:
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {"device": f"cpu: {cpu}, {os.cpu_count()} cores", "threads": threads, "load_average_1min": load,
            "torch": torch.__version__, "llama_cpp": peer_version("llama_cpp"),
            "transformers": peer_version("transformers"),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": _commit()}


def _note(message: str) -> None:
    if sys.stderr.isatty():
        print(f"[compare] {message}", file=sys.stderr)


def _fail(message: str) -> int:
    print(f"mixtral bench throughput --compare: {message}", file=sys.stderr)
    return 2
