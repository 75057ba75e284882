"""Measurements for tensor / expert parallelism: the per-GPU roofline, the all-reduce time per step, and the
collective and control-message costs behind the design choices (docs/PARALLEL.md).

- :func:`rank_decode_bytes` / :func:`decode_roofline_tok_s`: the bytes the busiest rank must read per decode step
  (its attention and expert slices, the experts of its own it is expected to hit, its KV heads, and on rank 0
  the replicated lm_head, which only it computes), and the tok/s that bound allows.
- :func:`allreduce_report`: the all-reduce time per step (2 per layer, [N, D] in the model dtype) timed on the
  group itself at decode and prefill sizes, for ``mixtral bench gpu --tensor-parallel-size N``.
- :func:`compare_collectives` / :func:`control_costs`: all-reduce against an all-to-all token dispatch for EP, and
  one fixed-size control broadcast per step against two (length, then payload). ``python -m
  mixtral.bench.parallel --nproc N [--device cuda]`` runs both on N local processes and prints them.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from typing import Any

import torch
import torch.distributed as dist

from mixtral.bench.roofline import StepBytes, WeightFormat, expected_experts_hit
from mixtral.distributed.config import ParallelConfig
from mixtral.model.args import ModelArgs
from mixtral.model.presets import PRESETS


# --------------------------------------------------------------------------- roofline per GPU
def rank_decode_bytes(args: ModelArgs, parallel: ParallelConfig, batch: int, context_len: int,
                      dtype_bytes: float = 2, fmt: WeightFormat | None = None,
                      kv_dtype_bytes: float | None = None) -> StepBytes:
    """Minimum bytes the busiest rank reads per decode step of ``batch`` sequences at ``context_len``: its
    attention share, the expected experts of the busiest expert group (each a 1/moe_tp slice), its KV heads,
    and the lm_head (rank 0 computes the logits). ``fmt``: bytes per parameter of each part as stored (quantized
    weights; default all in ``dtype_bytes``); ``kv_dtype_bytes``: the KV cache's element size (default
    ``dtype_bytes``)."""
    fmt = fmt or WeightFormat.plain(dtype_bytes)
    shard = parallel.layout(args, 0).shard_args(args)
    d = args.dim
    attn = d * (shard.q_size + 2 * shard.kv_size) + shard.q_size * d
    router_norms = d * args.num_experts + 2 * d
    hit = busiest_rank_experts(batch, args.num_experts, args.num_experts_per_tok, parallel.ep_size)
    experts = hit * 3 * d * shard.hidden_dim
    weights = (args.n_layers * (attn * fmt.attention + experts * fmt.experts + router_norms * fmt.dense)
               + (d + args.vocab_size * d + batch * d) * fmt.dense)
    kv = batch * context_len * shard.kv_bytes_per_token(1) * (dtype_bytes if kv_dtype_bytes is None
                                                                else kv_dtype_bytes)
    return StepBytes(weights=float(weights), kv=float(kv))


def busiest_rank_experts(batch: int, num_experts: int, top_k: int, ep_size: int, trials: int = 4096) -> float:
    """Expected experts the busiest of ``ep_size`` expert groups must read for ``batch`` tokens, uniform routing.

    The step waits for the slowest rank, so this is E[max over groups], not the mean: batch 1, top-2 of 8
    experts over 2 groups puts both chosen experts in one group 3 times in 7, so the busiest group reads
    10/7 = 1.43 experts where tensor parallelism reads 2 halves (1.0) on every rank. One group (TP): every
    expert hit, ``expected_experts_hit``. More groups: a seeded Monte Carlo over ``trials`` batches.
    """
    if ep_size == 1:
        return expected_experts_hit(batch, num_experts, top_k)
    gen = torch.Generator().manual_seed(0)
    chosen = torch.rand(trials, batch, num_experts, generator=gen).topk(top_k, dim=-1).indices  # [T, B, k]
    hit = torch.zeros(trials, num_experts, dtype=torch.bool)
    hit.scatter_(1, chosen.reshape(trials, -1), True)  # [T, E]
    per_group = hit.view(trials, ep_size, num_experts // ep_size).sum(-1)  # [T, groups]
    return float(per_group.max(-1).values.float().mean())


def decode_roofline_tok_s(args: ModelArgs, parallel: ParallelConfig, batch: int, context_len: int,
                          bandwidth: float, dtype_bytes: float = 2, fmt: WeightFormat | None = None,
                          kv_dtype_bytes: float | None = None) -> float:
    """Tokens/s if a decode step took the busiest rank's bytes / one GPU's ``bandwidth`` (collectives free)."""
    step = rank_decode_bytes(args, parallel, batch, context_len, dtype_bytes, fmt, kv_dtype_bytes)
    return batch / (step.total / bandwidth)


# --------------------------------------------------------------------------- all-reduce per step
def allreduce_report(executor: Any, args: ModelArgs, num_tokens: list[int], iters: int = 20) -> list[dict[str, Any]]:
    """Per step size N (decode batch or prefill tokens): one [N, D] all-reduce's median time on the group and
    the step's total (2 per layer)."""
    times = executor.bench_all_reduce(num_tokens, iters)
    return [{"tokens": n, "all_reduce_us": times[n] * 1e6, "per_step_ms": 2 * args.n_layers * times[n] * 1e3}
            for n in num_tokens]


def gpu_report(engine: Any, batches: list[int], context: int, prefill_len: int, bandwidth: float,
               decode_tok_s: dict[int, float], iters: int = 20, fmt: WeightFormat | None = None,
               kv_dtype_bytes: float | None = None) -> dict[str, Any]:
    """What ``mixtral bench gpu --tensor-parallel-size N`` adds: per decode batch the per-GPU roofline (busiest
    rank's bytes over one GPU's bandwidth, weights as ``fmt`` stores them) and the fraction reached, and for
    each batch and the prefill the all-reduce time per step and its share of the measured step."""
    executor = engine.model_runner.executor
    args: ModelArgs = executor.source.args  # the full model's (engine.model_args is rank 0's shard)
    parallel: ParallelConfig = executor.parallel
    reduces = {r["tokens"]: r for r in allreduce_report(executor, args, [*batches, prefill_len], iters)}
    rows = []
    for b in batches:
        roof = decode_roofline_tok_s(args, parallel, b, context, bandwidth, fmt=fmt, kv_dtype_bytes=kv_dtype_bytes)
        tok_s = decode_tok_s.get(b)
        step_ms = b / tok_s * 1e3 if tok_s else None
        reduce_ms = reduces[b]["per_step_ms"]
        rows.append({"batch": b, "roofline_per_gpu_tok_s": roof, "fraction": tok_s / roof if tok_s else None,
                     "all_reduce_ms_per_step": reduce_ms,
                     "all_reduce_share": reduce_ms / step_ms if step_ms else None})
    return {"layout": parallel.describe(), "ranks": parallel.world_size, "decode": rows,
            "prefill_all_reduce_ms": reduces[prefill_len]["per_step_ms"],
            "all_reduce_us": {n: r["all_reduce_us"] for n, r in reduces.items()}}


# --------------------------------------------------------------------------- design measurements
# torch 2.13 renamed all_gather_into_tensor (deprecated there); GPU images may carry an older torch.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
def _timed(fn: Any, device: torch.device, iters: int) -> float:
    """Median seconds of ``fn()`` over ``iters`` calls (after 3 warm-ups), every rank in lockstep."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _dispatch(send: torch.Tensor, recv: torch.Tensor, part: torch.Tensor, gathered: torch.Tensor,
              group: dist.ProcessGroup | None) -> None:
    dist.all_to_all_single(recv, send, group=group)  # tokens out to their experts' ranks
    dist.all_to_all_single(send, recv, group=group)  # results back
    _all_gather(gathered, part, group=group)  # every token on every rank again, for attention


def compare_collectives(group: dist.ProcessGroup | None, sizes: list[int], dim: int, top_k: int,
                        dtype: torch.dtype, device: torch.device, iters: int = 20) -> list[dict[str, float]]:
    """For N tokens on every rank: the all-reduce that finishes an EP MoE here, against a token dispatch: each
    rank sends its N/p tokens' k copies to their experts' ranks and gets the results back (two all-to-alls of
    k*N/p rows) and all-gathers the N/p outputs so attention has every token again (what a dispatch design
    needs when attention is tensor parallel). Uniform routing; sizes rounded to multiples of the group."""
    p = dist.get_world_size(group)
    out = []
    for n in sizes:
        n = max(p, n - n % p)
        x = torch.zeros(n, dim, dtype=dtype, device=device)
        send = torch.zeros(n // p * top_k, dim, dtype=dtype, device=device)
        tensors = (send, torch.empty_like(send), torch.zeros(n // p, dim, dtype=dtype, device=device),
                   torch.empty(n, dim, dtype=dtype, device=device))
        out.append({"tokens": n,
                    "all_reduce_us": _timed(functools.partial(dist.all_reduce, x, group=group), device, iters) * 1e6,
                    "dispatch_us": _timed(functools.partial(_dispatch, *tensors, group), device, iters) * 1e6})
    return out


def _one_broadcast(channel: Any, msg: torch.Tensor, rank: int) -> None:
    if rank == 0:
        channel.send(msg)
    else:
        channel.recv()


def _two_broadcasts(msg: torch.Tensor, rank: int, group: dist.ProcessGroup | None) -> None:
    length = torch.tensor([msg.shape[0]], dtype=torch.int64)
    dist.broadcast(length, src=0, group=group)
    buf = msg if rank == 0 else torch.empty(int(length[0]), dtype=torch.int64)
    dist.broadcast(buf, src=0, group=group)


def control_costs(group: dist.ProcessGroup, sizes: list[int], capacity: int, iters: int = 50
                  ) -> list[dict[str, float]]:
    """Per message size (int64 entries): the control channel's one fixed broadcast of ``capacity`` slots,
    against two broadcasts (a length, then exactly the payload). CPU tensors (the gloo control group)."""
    from mixtral.distributed.protocol import ControlChannel

    channel = ControlChannel(group, capacity)
    rank = dist.get_rank(group)
    cpu = torch.device("cpu")
    out = []
    for n in sizes:
        msg = torch.arange(n, dtype=torch.int64)
        out.append({"entries": n,
                    "one_broadcast_us": _timed(functools.partial(_one_broadcast, channel, msg, rank), cpu, iters) * 1e6,
                    "two_broadcasts_us": _timed(functools.partial(_two_broadcasts, msg, rank, group), cpu, iters)
                    * 1e6})
    return out


def _measure_rank(rank: int, world: int, port: int, device_type: str, model: str, sizes: list[int], iters: int,
                  result_file: str) -> None:
    from datetime import timedelta

    from mixtral.distributed.protocol import CONTROL_CAPACITY

    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=timedelta(seconds=120))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank, world_size=world)
    control_group = dist.new_group(backend="gloo")
    args = PRESETS[model]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    collectives = compare_collectives(None, sizes, args.dim, args.num_experts_per_tok, dtype, device, iters)
    # Step messages of 8, 64 and 256 decoding sequences (7 + 6 entries each), and a prompt chunk past the buffer.
    control = control_costs(control_group, [7 + 6 * 8, 7 + 6 * 64, 7 + 6 * 256, CONTROL_CAPACITY + 50],
                            CONTROL_CAPACITY, iters)
    if rank == 0:
        with open(result_file, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (gloo)",
                       "ranks": world, "model_dim": args.dim, "dtype": str(dtype), "collectives": collectives,
                       "control": control}, fh, indent=2)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mixtral.bench.parallel",
                                description="Time the collectives behind the parallel design on N local processes: "
                                            "all-reduce against an all-to-all dispatch at [N, dim], and the "
                                            "control channel's one broadcast per step against two.")
    p.add_argument("--nproc", type=int, default=2, help="processes (GPUs with --device cuda) (default: 2)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="gloo on CPU or NCCL on GPUs")
    p.add_argument("--model", default="mixtral-8x7b", choices=sorted(PRESETS),
                   help="preset whose hidden size and top-k shape the tensors (default: mixtral-8x7b)")
    p.add_argument("--sizes", default="1,8,64,256,2048",
                   help="comma-separated token counts N of the [N, dim] collectives (default: 1,8,64,256,2048)")
    p.add_argument("--iters", type=int, default=20, help="timed repetitions of each (default: 20)")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    import tempfile

    import torch.multiprocessing as mp

    from mixtral.serve.inprocess import free_port

    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
        mp.spawn(_measure_rank, args=(args.nproc, free_port(), args.device, args.model, sizes, args.iters, result),
                 nprocs=args.nproc)
        with open(result) as fh:
            data = json.load(fh)
    print(f"{data['device']}, {data['ranks']} ranks, [N, {data['model_dim']}] {data['dtype']}")
    print(f"{'tokens':>8} {'all-reduce us':>14} {'dispatch us':>12}")
    for r in data["collectives"]:
        print(f"{r['tokens']:>8} {r['all_reduce_us']:>14.1f} {r['dispatch_us']:>12.1f}")
    print(f"{'entries':>8} {'1 broadcast us':>15} {'2 broadcasts us':>16}")
    for r in data["control"]:
        print(f"{r['entries']:>8} {r['one_broadcast_us']:>15.1f} {r['two_broadcasts_us']:>16.1f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(data, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
