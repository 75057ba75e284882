"""The peers of ``mixtral bench gpu --peer``: other programs decoding the same shapes on our weights (no second
copy), for the ratio in the table. ``hf``: transformers' ``MixtralForCausalLM`` (what a user would pick
instead); ``compiled``: a gpt-fast style decode step compiled whole by ``torch.compile`` (``compiled_peer.py``).

Only an unquantized model on one GPU has weights a peer can view; bench/gpu_runner.py runs them there.
"""

from __future__ import annotations

import gc
import time
from typing import Any

import torch

from mixtral.bench.gpu_measure import prompts
from mixtral.model.args import ModelArgs
from mixtral.model.config_formats import args_to_hf_config


def _sync() -> None:
    torch.cuda.synchronize()


def build_hf_peer(model: torch.nn.Module, margs: ModelArgs) -> torch.nn.Module:
    """transformers' MixtralForCausalLM whose parameters are views of ours: no second copy of the weights."""
    from transformers import MixtralConfig, MixtralForCausalLM

    skip = ("architectures", "model_type", "torch_dtype")
    cfg_dict = {k: v for k, v in args_to_hf_config(margs).items() if k not in skip}
    # grouped_mm is transformers' fastest experts implementation on Hopper (its default gathers each token's
    # expert weights, which runs out of memory at a 512-token batch-128 prefill).
    cfg = MixtralConfig(**cfg_dict, experts_implementation="grouped_mm", attn_implementation="sdpa")
    cfg._experts_implementation = "grouped_mm"  # older transformers 5.x ignore the keyword
    with torch.device("meta"):
        hf = MixtralForCausalLM(cfg)
    sd: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": model.tok_embeddings.weight,
        "model.norm.weight": model.norm.weight,
        "lm_head.weight": model.output.weight,
    }
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        q, k, v = layer.attention.wqkv.weight.split([margs.q_size, margs.kv_size, margs.kv_size])
        sd.update({
            p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
            p + "self_attn.o_proj.weight": layer.attention.wo.weight,
            p + "input_layernorm.weight": layer.attention_norm.weight,
            p + "post_attention_layernorm.weight": layer.ffn_norm.weight,
            p + "mlp.gate.weight": layer.feed_forward.gate.weight,
            p + "mlp.experts.gate_up_proj": layer.feed_forward.w13,
            p + "mlp.experts.down_proj": layer.feed_forward.w2,
        })
    hf.load_state_dict(sd, strict=True, assign=True)
    # Rotary inverse frequencies are a non-persistent buffer: rebuild them on the real device.
    hf.model.rotary_emb = type(hf.model.rotary_emb)(cfg, device=model.device)
    return hf.eval()


def bench_hf_decode(hf: torch.nn.Module, margs: ModelArgs, batch: int, context: int, steps: int) -> float:
    """Decode tok/s of transformers' generate: time(steps + 1 new tokens) - time(1 new token)."""
    ids = torch.tensor(prompts(margs.vocab_size, batch, context, seed=batch), device=hf.device)

    def gen(new: int) -> float:
        _sync()
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        _sync()
        return time.perf_counter() - t0

    gen(2)  # warm-up
    return batch * steps / max(gen(steps + 1) - gen(1), 1e-9)


def run_peer(peer: str, model: torch.nn.Module, margs: ModelArgs, batches: list[int], context: int,
             decode_steps: int, ours: list[dict[str, Any]], console: Any) -> list[dict[str, Any]]:
    """Decode tok/s of one peer at each batch size, with our figure's ratio to it; a batch that runs out of
    GPU memory is reported as such (transformers' default experts gather per-token weight copies)."""
    from mixtral.bench.compiled_peer import bench_compiled_decode

    hf = build_hf_peer(model, margs) if peer == "hf" else None
    steps = min(decode_steps, 32)
    out = []
    for b in batches:
        try:
            if hf is not None:
                tok_s = bench_hf_decode(hf, margs, b, context, steps)
            else:
                ids = torch.tensor(prompts(margs.vocab_size, b, context, seed=b), device=model.device)
                tok_s = bench_compiled_decode(model, margs, ids, steps)
        except torch.OutOfMemoryError:
            gc.collect()
            torch.cuda.empty_cache()
            console.print(f"peer {peer} decode batch {b:4d}: out of GPU memory")
            out.append({"batch": b, "tok_s": None, "ours_over_peer": None, "error": "out of memory"})
            continue
        except Exception as exc:  # a peer that breaks (a compiler error, say) must not lose our figures
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            console.print(f"peer {peer} decode batch {b:4d}: failed, {why}")
            out.append({"batch": b, "tok_s": None, "ours_over_peer": None, "error": why})
            continue
        mine = next(r["tok_s"] for r in ours if r["batch"] == b)
        out.append({"batch": b, "tok_s": tok_s, "ours_over_peer": mine / tok_s})
        console.print(f"peer {peer} decode batch {b:4d}: {tok_s:9.1f} tok/s  (ours {mine / tok_s:.1f}x)")
    del hf
    gc.collect()
    torch.cuda.empty_cache()
    return out
