"""``kv_cache_dtype="fp8"``: the engine's FP8 KV cache (kernels/kv_fp8.py numerics) end to end on CPU.

- the config refuses what it cannot run and names the allowed values;
- the same byte budget holds twice the blocks of a bf16 cache (four times an fp32 one);
- the engine's greedy output equals an unpaged reference that rounds each stored K/V to its e4m3 code (with
  scales 1.0, and with the scales a config or a checkpoint gives): the FP8 cache computes exactly what it
  should; chunked prefill, prefix caching and preemption leave that output unchanged;
- against the cache in the model's dtype the output is close, not equal: agreement is printed, the logit
  difference bounded.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from contiguous_kv import ContiguousKVContext
from engine_testing import build_tiny_model, greedy_reference, random_prompts, run_to_completion
from safetensors.torch import save_file

from mixtral.checkpoint.errors import CheckpointError
from mixtral.checkpoint.fp8_formats import quantization_config_block
from mixtral.checkpoint.kv_scales import read_kv_scales
from mixtral.checkpoint.loader import resolve
from mixtral.engine import llm_engine
from mixtral.engine.attention import PagedAttentionContext
from mixtral.engine.config import EngineConfig
from mixtral.engine.llm_engine import LLMEngine
from mixtral.engine.memory import plan_num_blocks
from mixtral.engine.model_runner import ModelRunner
from mixtral.engine.sampler import Sampler
from mixtral.kernels import kv_fp8
from mixtral.kernels.dispatch import Kernels
from mixtral.model.config_formats import args_to_hf_config
from mixtral.model.mixtral import Transformer
from mixtral.model.presets import preset
from mixtral.sampling import SamplingParams

FP8 = torch.float8_e4m3fn
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


# --------------------------------------------------------------------------- config
def test_config_refuses_unknown_dtypes_and_bad_scales() -> None:
    with pytest.raises(ValueError, match=r"kv_cache_dtype must be one of 'auto', 'fp8', 'fp8_e4m3', got 'int8'"):
        EngineConfig(kv_cache_dtype="int8")
    with pytest.raises(ValueError, match="one of"):
        EngineConfig(kv_cache_dtype="FP8")
    assert EngineConfig(kv_cache_dtype="fp8_e4m3").kv_cache_dtype == "fp8"  # vLLM's alias, kept as fp8
    assert EngineConfig().cache_dtype(torch.bfloat16) == torch.bfloat16
    assert EngineConfig(kv_cache_dtype="fp8").cache_dtype(torch.bfloat16) == FP8
    with pytest.raises(ValueError, match=r"kv_cache_scales\[1\] = \(1.0, -0.5\)"):
        EngineConfig(kv_cache_scales=((1.0, 1.0), (1.0, -0.5)))
    with pytest.raises(ValueError, match="finite and positive"):
        EngineConfig(kv_cache_scales=((float("nan"), 1.0),))
    with pytest.raises(ValueError, match="pairs, one per layer"):
        EngineConfig(kv_cache_scales=(1.0, 2.0))
    # The parallel workers receive the config as JSON: lists come back as tuples of floats.
    assert EngineConfig(kv_cache_scales=[[1, 2], [0.5, 0.25]]).kv_cache_scales == ((1.0, 2.0), (0.5, 0.25))


def test_runner_refuses_scales_for_another_layer_count(tiny_model: Transformer) -> None:
    config = EngineConfig(kv_cache_dtype="fp8", kv_cache_scales=((1.0, 1.0),) * 3, num_kv_blocks=8,
                          max_model_len=64).resolve(tiny_model.args.max_seq_len)
    with pytest.raises(ValueError, match=r"3 \(k_scale, v_scale\) pairs for a model of 2 layers"):
        ModelRunner(tiny_model, config, Sampler(tiny_model.args.vocab_size, 2))


# --------------------------------------------------------------------------- memory
def test_the_same_bytes_hold_twice_the_blocks() -> None:
    args = preset("tiny")
    budget = 3 * 2**20
    base = EngineConfig(kv_cache_bytes=budget, max_model_len=256).resolve(args.max_seq_len)
    fp8 = EngineConfig(kv_cache_bytes=budget, max_model_len=256, kv_cache_dtype="fp8").resolve(args.max_seq_len)
    cpu = torch.device("cpu")
    bf16_blocks = plan_num_blocks(base, args, torch.bfloat16, cpu)
    assert plan_num_blocks(fp8, args, torch.bfloat16, cpu) == 2 * bf16_blocks
    assert plan_num_blocks(fp8, args, torch.float32, cpu) == 4 * plan_num_blocks(base, args, torch.float32, cpu)
    # 1 byte per element: 2 (K, V) x layers x KV heads x head_dim bytes per token.
    assert budget // plan_num_blocks(fp8, args, torch.bfloat16, cpu) // 16 == args.kv_bytes_per_token(1)


def test_engine_allocates_fp8_blocks_in_the_same_budget(tiny_model: Transformer) -> None:
    budget = 2 * 2**20
    engines = {dt: LLMEngine(tiny_model, EngineConfig(kv_cache_bytes=budget, max_model_len=256,
                                                      kv_cache_dtype=dt))
               for dt in ("auto", "fp8")}
    auto, fp8 = engines["auto"], engines["fp8"]
    assert fp8.block_manager.num_blocks == 4 * auto.block_manager.num_blocks  # the tiny model is fp32 here
    k_cache, v_cache = fp8.model_runner.kv_caches[0]
    assert k_cache.dtype == v_cache.dtype == FP8
    used = sum(c.numel() * c.element_size() for pair in fp8.model_runner.kv_caches for c in pair)
    assert used <= budget and used == sum(c.numel() * c.element_size()
                                          for pair in auto.model_runner.kv_caches for c in pair)
    assert fp8.model_runner.kv_scales == [(1.0, 1.0)] * tiny_model.args.n_layers
    assert auto.model_runner.kv_scales is None
    for engine in engines.values():
        engine.shutdown()


# --------------------------------------------------------------------------- exactness
class RoundingKVContext(ContiguousKVContext):
    """The unpaged reference with every stored K/V rounded to its e4m3 code times the layer's scale: what an
    FP8 cache should hold, kept in the model's dtype."""

    def __init__(self, *args: object, scales: list[tuple[float, float]], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.scales = scales

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ks, vs = self.scales[layer_idx]
        k = kv_fp8.dequantize_kv(kv_fp8.quantize_kv(k, ks), ks).to(k.dtype)
        v = kv_fp8.dequantize_kv(kv_fp8.quantize_kv(v, vs), vs).to(v.dtype)
        return super().attend(layer_idx, q, k, v)


def rounded_greedy(model: Transformer, prompt: list[int], max_tokens: int,
                   scales: list[tuple[float, float]]) -> list[int]:
    """Greedy tokens through the rounding reference (prefill, then one token a step)."""
    return greedy_reference(model, prompt, max_tokens,
                            context=lambda cache, start, n: RoundingKVContext(cache, start, n, scales=scales))


def _greedy(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    done = run_to_completion(engine)
    return [done[str(i)].outputs[0].token_ids for i in range(len(prompts))]


@pytest.mark.parametrize("scales", [None, ((0.25, 0.5), (2.0, 0.125))], ids=["scale1", "given"])
def test_fp8_engine_equals_the_rounding_reference(make_engine: Callable[..., LLMEngine], tiny_model: Transformer,
                                                  scales: tuple | None) -> None:
    prompts = random_prompts(4, 3, 30, seed=11)
    engine = make_engine(kv_cache_dtype="fp8", kv_cache_scales=scales)
    got = _greedy(engine, prompts)
    per_layer = list(scales) if scales is not None else [(1.0, 1.0)] * tiny_model.args.n_layers
    want = [rounded_greedy(tiny_model, p, GREEDY.max_tokens, per_layer) for p in prompts]
    assert got == want


def test_chunking_prefix_caching_and_preemption_leave_fp8_output_unchanged(
        make_engine: Callable[..., LLMEngine]) -> None:
    prompts = random_prompts(5, 20, 60, seed=12)
    prompts.append(prompts[0][:40] + prompts[1][:5])  # shares prompt 0's first 2 full blocks: a prefix hit
    base = _greedy(make_engine(kv_cache_dtype="fp8", enable_prefix_caching=False), prompts)
    chunked = make_engine(kv_cache_dtype="fp8", max_num_batched_tokens=16, enable_prefix_caching=True)
    assert _greedy(chunked, prompts) == base
    assert chunked.block_manager.prefix_cache_hit_rate > 0
    tight = make_engine(kv_cache_dtype="fp8", num_kv_blocks=30, block_size=4, max_model_len=96)  # preempts
    assert _greedy(tight, prompts) == base
    assert tight.scheduler.num_preemptions > 0


# --------------------------------------------------------------------------- against the model's dtype
@torch.inference_mode()
def _paged_logits(model: Transformer, prompt: list[int], steps: int, cache_dtype: torch.dtype,
                  feed: list[int] | None = None) -> tuple[torch.Tensor, list[int]]:
    """Logits [len(prompt) + steps - 1 ... ] of one sequence through the paged context: the prompt's, then one
    decode step at a time fed ``feed`` (or its own greedy choice). Returns (logits [P + steps - 1, V], fed)."""
    args, block = model.args, 16
    total = len(prompt) + steps
    nb = -(-total // block)
    shape = (nb, block, args.n_kv_heads, args.head_dim)
    caches = [(torch.zeros(shape, dtype=cache_dtype), torch.zeros(shape, dtype=cache_dtype))
              for _ in range(args.n_layers)]
    table = torch.arange(nb, dtype=torch.int32)[None]
    kernels: Kernels = model.kernels
    rows, fed = [], []
    tokens, start = list(prompt), 0
    for step in range(steps + 1):
        n = len(tokens)
        pos = torch.arange(start, start + n)
        ctx = PagedAttentionContext(
            positions=pos, slot_mapping=pos, block_tables=table,
            context_lens=torch.tensor([start + n], dtype=torch.int32),
            query_start_loc=torch.tensor([0, n], dtype=torch.int32), max_query_len=n,
            max_context_len=start + n, kv_caches=caches, kernels=kernels,
            kv_scales=[(1.0, 1.0)] * args.n_layers if cache_dtype == FP8 else None)
        logits = model.compute_logits(model.forward_tokens(torch.tensor(tokens), ctx)).float()  # [n, V]
        rows.append(logits if step == 0 else logits[-1:])
        if step == steps:
            break
        nxt = feed[step] if feed is not None else int(logits[-1].argmax())
        fed.append(nxt)
        start += n
        tokens = [nxt]
    return torch.cat(rows), fed


def test_fp8_against_the_model_dtype_cache(capsys: pytest.CaptureFixture[str]) -> None:
    """Greedy agreement is reported and loosely bounded (a random model has near-ties everywhere, and rounding
    any K/V flips some); the logits, on the same tokens, stay within a bound. The model: the tiny preset at init
    std 0.1 (tests/conftest.py's checkpoints; the engine tests' std 0.2 makes attention so peaked that it
    amplifies any rounding: 12% relative logit difference there)."""
    model = build_tiny_model(std=0.1)
    prompts = random_prompts(8, 8, 40, seed=13)
    same_tokens, total, diffs, spreads, kl = 0, 0, [], [], []
    for p in prompts:
        ref, fed = _paged_logits(model, p, 8, model.dtype)
        got, _ = _paged_logits(model, p, 8, FP8, feed=fed)  # the same tokens: logits comparable row by row
        diffs.append((got - ref).abs().mean().item())
        spreads.append(ref.std().item())
        ref_lp, got_lp = ref.log_softmax(-1), got.log_softmax(-1)
        kl.append((ref_lp.exp() * (ref_lp - got_lp)).sum(-1).mean().item())
        agree = got.argmax(-1) == ref.argmax(-1)
        same_tokens += int(agree.sum())
        total += agree.numel()
    rel, mean_kl = sum(diffs) / sum(spreads), sum(kl) / len(kl)
    with capsys.disabled():
        print(f"\nFP8 vs {model.dtype} KV cache, tiny model: argmax agreement {same_tokens}/{total}, mean "
              f"|logit difference| {sum(diffs) / len(diffs):.4f} ({rel:.1%} of the logits' spread), "
              f"KL {mean_kl:.4f} nats")
    # Measured when written: 195/236 (83%), 7.7% of the spread, KL 0.0097.
    assert rel < 0.12, rel
    assert mean_kl < 0.02, mean_kl
    assert same_tokens / total > 0.7


# --------------------------------------------------------------------------- checkpoint scales
def _scales_folder(root: Path, layers: int, kind: str, values: list[tuple[float, float]],
                   sharded: bool = False) -> Path:
    """A folder with the tiny preset's config.json announcing KV scales (compressed-tensors or AutoFP8) and
    safetensors holding just those scales (read_kv_scales reads nothing else)."""
    folder = root / f"{kind}{'-sharded' if sharded else ''}"
    folder.mkdir()
    config = args_to_hf_config(preset("tiny"))
    if kind == "ct":
        block = quantization_config_block()
        block["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
                                    "symmetric": True}
        names = [(f"model.layers.{i}.self_attn.k_scale", f"model.layers.{i}.self_attn.v_scale")
                 for i in range(layers)]
    else:
        block = {"quant_method": "fp8", "activation_scheme": "dynamic", "kv_cache_scheme": "static"}
        names = [(f"model.layers.{i}.self_attn.k_proj.output_scale", f"model.layers.{i}.self_attn.v_proj.output_scale")
                 for i in range(layers)]
    config["quantization_config"] = block
    (folder / "config.json").write_text(json.dumps(config))
    tensors = {}
    for (kn, vn), (ks, vs) in zip(names, values, strict=True):
        tensors[kn] = torch.tensor([ks])  # compressed-tensors writes [1]
        tensors[vn] = torch.tensor(vs, dtype=torch.bfloat16)  # and a 0-d bf16 one is accepted as well
    if sharded:
        first = dict(list(tensors.items())[:1])
        rest = dict(list(tensors.items())[1:])
        save_file(first, folder / "model-00001-of-00002.safetensors")
        save_file(rest, folder / "model-00002-of-00002.safetensors")
        weight_map = {n: "model-00001-of-00002.safetensors" for n in first}
        weight_map |= {n: "model-00002-of-00002.safetensors" for n in rest}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        save_file(tensors, folder / "model.safetensors")
    return folder


@pytest.mark.parametrize(("kind", "sharded"), [("ct", False), ("autofp8", False), ("ct", True)])
def test_checkpoint_scales_are_read(tmp_path: Path, kind: str, sharded: bool) -> None:
    values = [(0.5, 0.25), (2.0, 0.125)]
    folder = _scales_folder(tmp_path, 2, kind, values, sharded)
    assert read_kv_scales(resolve(str(folder))) == tuple(values)
    assert read_kv_scales(resolve("tiny")) is None and read_kv_scales(resolve("demo")) is None


def test_bad_checkpoint_scales_are_refused(tmp_path: Path) -> None:
    folder = _scales_folder(tmp_path, 2, "ct", [(0.5, 0.25), (2.0, 0.125)])
    save_file({"model.layers.0.self_attn.k_scale": torch.tensor([0.5])}, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'model.layers.0.self_attn.v_scale' is not in the checkpoint"):
        read_kv_scales(resolve(str(folder)))
    tensors = {f"model.layers.{i}.self_attn.{n}": torch.tensor([1.0]) for i in range(2) for n in ("k_scale", "v_scale")}
    tensors["model.layers.1.self_attn.v_scale"] = torch.tensor([0.0])
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"v_scale.* is 0.0; it must be finite and positive"):
        read_kv_scales(resolve(str(folder)))
    tensors["model.layers.1.self_attn.v_scale"] = torch.tensor([1.0, 2.0])
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"must be one float, got torch.float32 \[2\]"):
        read_kv_scales(resolve(str(folder)))


def test_from_config_uses_the_checkpoint_scales(tmp_path: Path, tiny_model: Transformer,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """``LLMEngine.from_config(folder, kv_cache_dtype="fp8")`` takes the folder's scales (the weights come from
    a stand-in loader here: loading quantized checkpoints is the loader's job, tested with it)."""
    values = [(0.5, 0.25), (2.0, 0.125)]
    folder = _scales_folder(tmp_path, 2, "ct", values)
    monkeypatch.setattr(llm_engine, "load_for_engine",
                        lambda model, *a, **k: (tiny_model, None, str(model)))
    kwargs = dict(num_kv_blocks=16, max_model_len=64)
    engine = LLMEngine.from_config(str(folder), kv_cache_dtype="fp8", **kwargs)
    assert engine.model_runner.kv_scales == values
    assert LLMEngine.from_config(str(folder), kv_cache_dtype="fp8_e4m3", **kwargs).model_runner.kv_scales == values
    given = [(1.0, 1.0), (1.0, 1.0)]
    assert LLMEngine.from_config(str(folder), kv_cache_dtype="fp8", kv_cache_scales=given,
                                 **kwargs).model_runner.kv_scales == given  # explicit scales win
    assert LLMEngine.from_config(str(folder), **kwargs).model_runner.kv_scales is None  # auto: not read


# --------------------------------------------------------------------------- command line
def test_flag_on_every_engine_command_and_info(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from mixtral.cli.kv_args import kv_cache_kwargs
    from mixtral.cli.main import main

    for command in (["serve"], ["generate", "x"], ["chat"], ["bench", "throughput"], ["bench", "gpu"]):
        with pytest.raises(SystemExit):
            main([*command, "--kv-cache-dtype", "int8"])
        err = capsys.readouterr().err
        assert "invalid choice: 'int8' (choose from 'auto', 'fp8', 'fp8_e4m3')" in err, (command, err)
    assert kv_cache_kwargs(argparse.Namespace(kv_cache_dtype="fp8_e4m3")) == {"kv_cache_dtype": "fp8_e4m3"}
    assert kv_cache_kwargs(argparse.Namespace()) == {"kv_cache_dtype": "auto"}  # a namespace built in code
    infos = {}
    for dt in ("auto", "fp8"):
        assert main(["info", "mixtral-8x22b", "--kv-cache-dtype", dt, "--json"]) == 0
        infos[dt] = json.loads(capsys.readouterr().out)["kv_cache"]
    args = preset("mixtral-8x22b")
    assert infos["fp8"]["bytes_per_token"] == args.kv_bytes_per_token(1) == infos["auto"]["bytes_per_token"] // 2
    assert infos["auto"]["max_context_tokens"] == 0  # 8x22B's bf16 weights alone are far past 80 GB
    assert main(["info", "demo", "--kv-cache-dtype", "fp8"]) == 0
    out = capsys.readouterr().out
    assert "KV cache as asked (fp8): 512 B/token" in out


