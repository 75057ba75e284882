"""``load_model(..., quantization=)`` quantizes a float checkpoint while it streams: the result is the float
model's weights quantized (exactly, piece by piece), its logits are the dequantized model's (weight-only int:
to fp32 rounding), the peak of allocated memory is the quantized model plus about one piece, never the float
model; presets quantize piece by piece too; the engine (``LLM``) decodes a quantized model greedily as the
model's own forward does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from mixtral import LLM, SamplingParams
from mixtral.checkpoint.hf import hf_specs
from mixtral.checkpoint.loader import load_model, resolve
from mixtral.checkpoint.writer import save_checkpoint
from mixtral.distributed.config import ParallelConfig
from mixtral.distributed.sharded_loader import load_shard
from mixtral.kernels.config import KernelConfig
from mixtral.model.args import ModelArgs
from mixtral.model.mixtral import Transformer, init_random_weights
from mixtral.model.quantized import quant_weights
from mixtral.quant import QuantSpec, get_method

# Many small pieces (4 layers x 8 experts) beside small embeddings: the float model is ~12x one piece group.
ARGS = ModelArgs(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=256, vocab_size=512,
                 num_experts=8, num_experts_per_tok=2, max_seq_len=256)
IDS = torch.randint(0, ARGS.vocab_size, (2, 10), generator=torch.Generator().manual_seed(4))


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Transformer]:
    model = Transformer(ARGS)
    init_random_weights(model, seed=3, std=0.05)
    folder = save_checkpoint(model, ARGS, tmp_path_factory.mktemp("bf16"), "hf", dtype=torch.bfloat16)
    return folder, load_model(str(folder), "cpu", torch.float32)


def _method(scheme: str) -> object:
    return get_method(QuantSpec(scheme, group_size=128 if scheme == "int4" else 0))


@pytest.mark.parametrize("scheme", ["fp8", "int8", "int4"])
def test_quantized_while_loading_is_the_float_model_quantized(scheme: str, bf16_checkpoint) -> None:
    folder, full = bf16_checkpoint
    model = load_model(str(folder), "cpu", torch.float32, quantization=scheme)
    method = _method(scheme)
    params = dict(full.named_parameters())
    reference = Transformer(ARGS)
    reference.load_state_dict(full.state_dict())
    ref_params = dict(reference.named_parameters())
    qweights = dict(quant_weights(model))
    assert len(qweights) == 4 * ARGS.n_layers and {q.method.name for q in qweights.values()} == {scheme}
    for path, qw in qweights.items():
        param = path + ".weight" if path.endswith(("wqkv", "wo")) else path
        want = method.quantize(params[param].detach())
        for name, t in want.items():  # the same codes and scales as quantizing the whole weight at once
            fp8 = t.dtype == torch.float8_e4m3fn
            got = qw.tensors[name]
            assert torch.equal(got.view(torch.uint8) if fp8 else got, t.view(torch.uint8) if fp8 else t), (path, name)
        with torch.no_grad():
            ref_params[param].copy_(method.dequantize(want, torch.float32))
    assert qweights["layers.0.attention.wqkv"].method.format.group_size == 128 if scheme == "int4" else True
    for name in ("tok_embeddings.weight", "output.weight", "layers.0.feed_forward.gate.weight", "norm.weight"):
        assert torch.equal(dict(model.named_parameters())[name], params[name])  # kept in the model dtype
    with torch.no_grad():
        got, want = model(IDS), reference.eval()(IDS)
    if scheme == "fp8":  # activations quantized per token as well: within e4m3's rounding of them
        assert ((got - want).norm() / want.norm()).item() < 0.1
    else:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _peak_allocated(fn) -> tuple[int, object]:
    """The peak of bytes allocated (and not yet freed) by PyTorch's CPU allocator while ``fn`` runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak, out


@pytest.mark.parametrize("scheme", ["fp8", "int4"])
def test_peak_memory_is_the_quantized_model_plus_one_piece(scheme: str, bf16_checkpoint) -> None:
    folder, full = bf16_checkpoint
    peak, model = _peak_allocated(lambda: load_model(str(folder), "cpu", torch.float32, quantization=scheme))
    # safetensors maps the file (one storage of the file's size, which the profiler counts as allocated; its
    # pages are the page cache, read only where a tensor is read): not memory the load holds. On CUDA each
    # tensor is read straight onto the device instead.
    peak -= (folder / "model.safetensors").stat().st_size
    kept = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    float_model = sum(p.numel() * 4 for p in full.parameters())
    largest_piece = max(torch.Size(s.shape).numel() for s in hf_specs(ARGS) if ".experts." in s.name) * 4
    # one piece read, its fp32 copy and the quantizer's fp32 temporaries: a few piece-sized buffers
    assert peak <= kept + 6 * largest_piece, (peak, kept, largest_piece)
    assert kept + 6 * largest_piece < 0.75 * float_model  # the bound is meaningful: far below the float model
    print(f"\n{scheme}: peak {peak / 2**20:.2f} MiB, quantized model {kept / 2**20:.2f} MiB, fp32 model "
          f"{float_model / 2**20:.2f} MiB, largest piece (fp32) {largest_piece / 2**20:.3f} MiB")


@pytest.mark.parametrize("scheme", ["fp8", "int8", "int4"])
def test_quantized_preset_is_the_piecewise_preset_quantized(scheme: str) -> None:
    """A preset with ``quantization=`` draws each piece as the sharded loader's presets do (no full float
    model ever), rounds it to the model dtype and quantizes it."""
    model = load_model("tiny", "cpu", torch.bfloat16, quantization=scheme, seed=2,
                       kernels=KernelConfig(backend="reference"))  # canonical layout, no CPU repacking
    floats = load_shard(resolve("tiny"), ParallelConfig(), 0, "cpu", torch.bfloat16, seed=2).model
    fparams = dict(floats.named_parameters())
    for path, qw in quant_weights(model):
        param = path + ".weight" if path.endswith(("wqkv", "wo")) else path
        for name, t in qw.method.quantize(fparams[param].detach()).items():
            got = qw.tensors[name]
            assert torch.equal(got.view(torch.uint8) if got.dtype == torch.float8_e4m3fn else got,
                               t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t), (path, name)
    with torch.no_grad():
        assert torch.isfinite(model(IDS % 1000)).all()


def test_bad_flag_fails_before_loading() -> None:
    with pytest.raises(ValueError, match="--quantization 'int3'"):
        load_model("tiny", quantization="int3")


@pytest.mark.parametrize("scheme", ["fp8", "int4"])
def test_llm_greedy_output_on_a_quantized_model(scheme: str, tiny_hf_checkpoint: Path) -> None:
    """The engine's paged, batched decode with quantized weights gives the tokens of the same quantized model's
    full-sequence greedy loop (the reference backend: dequantize / quantized reference matmuls)."""
    llm = LLM(str(tiny_hf_checkpoint), device="cpu", dtype="fp32", quantization=scheme, kv_cache_bytes=2**24,
              kernels=KernelConfig(backend="reference"))
    model = llm.llm_engine.model
    assert next(quant_weights(model))[1].method.name == scheme
    prompts = [[1, 100, 200, 300, 400], [1, 7, 8, 9]]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(8):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert out.outputs[0].token_ids == ids[len(prompt):]
    llm.llm_engine.shutdown()


def test_consolidated_checkpoint_quantizes_to_the_same_model(tiny_hf_checkpoint: Path,
                                                            tiny_consolidated_checkpoint: Path) -> None:
    """Mistral's consolidated layout (RoPE rows permuted at load) quantizes to the HF checkpoint's tensors."""
    hf = dict(quant_weights(load_model(str(tiny_hf_checkpoint), quantization="int4",
                                       kernels=KernelConfig(backend="reference"))))
    mistral = dict(quant_weights(load_model(str(tiny_consolidated_checkpoint), quantization="int4",
                                            kernels=KernelConfig(backend="reference"))))
    assert hf.keys() == mistral.keys()
    for path, qw in hf.items():
        for name, t in qw.tensors.items():
            assert torch.equal(mistral[path].tensors[name], t), (path, name)
