"""The CPU integer-dot kernel (kernels/int_dot.c via kernels/cpu_native.py) and its layout (quant/int_native.py).

The kernel is held to two references: an emulation in PyTorch of exactly what int_dot.c documents (int8
activations in blocks of 32, integer dots, fp32 scaling: equal up to fp32 summation order and the final bf16
rounding), and the fp32 truth of the dequantized weight (off by the int8 activations only, ~0.5%). Tests that
run the kernel carry the ``native_cpu`` marker (deselected in tests/conftest.py on a CPU that cannot run the build
they name); the machine-independent parts (layout, the choice, the errors) run everywhere.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from mixtral.kernels import cpu_native
from mixtral.kernels.config import KernelConfig
from mixtral.kernels.cpu_native import (
    VARIANTS,
    cpu_flags,
    int_dot_matmul,
    load_variant,
    native_variant,
    require_cpu_int_kernel,
)
from mixtral.quant import int_cpu
from mixtral.quant.int_layout import IntFormat, dequantize, quantize_rtn
from mixtral.quant.int_native import pack_codes, tile_scales

native = pytest.mark.native_cpu  # the best build this CPU runs
# Each build on its own (a CPU with AVX512-VNNI runs the AVX2 build too: both are checked there).
BUILDS = [pytest.param(v.name, marks=pytest.mark.native_cpu(v.name)) for v in VARIANTS]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------- the layout
def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """``pack_codes``' inverse, written from the documented layout: [*lead, T, bytes] -> uint8 [*lead, 16 T, K]."""
    *lead, t, nbytes = packed.shape
    if bits == 4:
        k = nbytes // 8
        v = packed.reshape(-1, t, k // 8, 16, 4)
        v = torch.stack((v & 0xF, v >> 4), dim=-1)  # [L, T, k/8, 16 c, 4 i, 2 h]
        return v.permute(0, 1, 3, 2, 5, 4).reshape(*lead, 16 * t, k)  # [L, T, 16 c, k/8, 2 h, 4 i]
    k = nbytes // 16
    return packed.reshape(-1, t, k // 4, 16, 4).permute(0, 1, 3, 2, 4).reshape(*lead, 16 * t, k)


def untile_scales(s: torch.Tensor) -> torch.Tensor:
    """``tile_scales``' inverse: [*lead, T, G, 16] -> [*lead, 16 T, G]."""
    *lead, t, g, _ = s.shape
    return s.transpose(-1, -2).reshape(*lead, 16 * t, g)


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_round_trips_and_matches_the_documented_bytes(bits: int) -> None:
    codes = torch.randint(0, 1 << bits, (2, 48, 64), generator=_gen(bits), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (2, 3, 64 * (8 if bits == 4 else 16)) and packed.dtype == torch.uint8
    assert torch.equal(unpack_codes(packed, bits), codes)
    m = codes[1, 16:32]  # the second tile of the second matrix
    if bits == 4:  # byte 4c + i of the run of columns 8..15: channel c's column 8 + i (low), 12 + i (high)
        run = packed[1, 1, 64:128]
        want = [int(m[c, 8 + i]) | int(m[c, 12 + i]) << 4 for c in range(16) for i in range(4)]
        assert run.tolist() == want
    else:  # byte 4c + i of the run of columns 4..7
        run = packed[1, 1, 64:128]
        assert run.tolist() == [int(m[c, 4 + i]) for c in range(16) for i in range(4)]


def test_tile_scales_round_trip() -> None:
    s = torch.randn(3, 32, 5)
    tiled = tile_scales(s)
    assert tiled.shape == (3, 2, 5, 16) and tiled[1, 1, 3, 7] == s[1, 23, 3]
    assert torch.equal(untile_scales(tiled), s)


# ----------------------------------------------------------------------------------------------- the kernel
def _emulated(x: torch.Tensor, codes: torch.Tensor, bits: int, group: int, s: torch.Tensor,
              z: torch.Tensor | None) -> torch.Tensor:
    """int_dot.c's arithmetic in fp64 from its documented steps: x [M, K] bf16, codes [N, K] unsigned, s/z [N, G]."""
    m, k = x.shape
    xf = x.float().view(m, k // 32, 32)
    scale = xf.abs().amax(-1, keepdim=True) / 127  # fp32, as the kernel
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    a = torch.round(xf * inv).double()  # [M, B, 32] round half to even, as cvtps2dq
    off = 8 if bits == 4 else 128
    u = (codes.double() - off).view(-1, k // 16, 16)  # [N, U, 16]: units of 16 columns
    a16 = a.view(m, k // 16, 16)  # [M, U, 16]
    d16 = scale.double().repeat_interleave(2, dim=1).view(m, 1, -1)  # [M, 1, U]: each unit's block scale
    dots = torch.einsum("muj,nuj->mnu", a16, u) * d16  # [M, N, U]
    per_group = dots.view(m, -1, k // group, group // 16).sum(-1)  # [M, N, G]
    y = (per_group * s.double()).sum(-1)
    if z is not None:
        zsum = (a16.sum(-1) * d16.view(m, -1)).view(m, k // group, group // 16).sum(-1)  # [M, G]
        y = y + (zsum[:, None, :] * z.double()).sum(-1)
    return y


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("bits,group,zero", [(4, 32, False), (4, 64, True), (4, 128, False), (8, 32, False),
                                             (8, 128, True), (8, 256, False), (4, 16, True), (8, 16, False),
                                             (8, 48, True)])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_matches_its_emulation_and_the_fp32_truth(bits: int, group: int, zero: bool, threads: int,
                                                         build: str) -> None:
    lib = load_variant(build)
    assert lib is not None
    n, k = 48, 768  # every group below divides it
    g = _gen(bits * 1000 + group)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
    s = (torch.rand(n, k // group, generator=g) * 0.02 + 0.01).bfloat16()
    z = (torch.randn(n, k // group, generator=g) * 0.05).bfloat16() if zero else None
    w = (codes.float() - (8 if bits == 4 else 128)).view(n, -1, group) * s.float()[..., None]
    if z is not None:
        w = w + z.float()[..., None]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for m in (1, 2, 3, 4, 5, 9):  # every row-chunk remainder of the kernel's passes of 4 rows
            x = torch.randn(m, k, generator=g).bfloat16()
            got = int_dot_matmul(x, pack_codes(codes, bits), bits, group, tile_scales(s),
                                 None if z is None else tile_scales(z), n, lib)
            assert got.shape == (m, n) and got.dtype == torch.bfloat16
            emulated = _emulated(x, codes, bits, group, s.float(), None if z is None else z.float())
            torch.testing.assert_close(got.double(), emulated, rtol=2 ** -8, atol=1e-3 * float(emulated.abs().max()))
            truth = x.float() @ w.view(n, k).t()
            assert float((got.float() - truth).norm() / truth.norm()) < 0.015
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("build", BUILDS)
def test_zero_rows_and_large_inputs_stay_finite(build: str) -> None:
    """A block of zeros has scale 0 (its codes 0, not NaN); large activations saturate nothing (|a| <= 127),
    nor do extreme int8 codes (-128, 127) in the AVX2 build's 16-bit pair sums."""
    n, k = 16, 64
    codes = torch.randint(0, 16, (n, k), generator=_gen(1), dtype=torch.uint8)
    s = torch.full((n, 2), 0.5).bfloat16()
    x = torch.zeros(2, k).bfloat16()
    x[1, 32:] = torch.linspace(-3e4, 3e4, 32)
    lib = load_variant(build)
    got = int_dot_matmul(x, pack_codes(codes, 4), 4, 32, tile_scales(s), None, n, lib).float()
    assert torch.equal(got[0], torch.zeros(n))
    truth = x.float() @ ((codes.float() - 8) * 0.5).t()
    assert torch.isfinite(got).all() and float((got[1] - truth[1]).norm() / truth[1].norm()) < 0.01
    extreme = torch.where(torch.rand(n, k, generator=_gen(2)) < 0.5, 0, 255).to(torch.uint8)  # codes -128 and 127
    x = torch.full((1, k), 1.0).bfloat16()
    x[0, ::2] = -1.0
    got = int_dot_matmul(x, pack_codes(extreme, 8), 8, 32, tile_scales(s), None, n, lib).float()
    torch.testing.assert_close(got, x.float() @ ((extreme.float() - 128) * 0.5).t(), rtol=2 ** -8, atol=0)


# ----------------------------------------------------------------------------------------------- the choice
FORMATS = [
    IntFormat(4, 32, torch.float16, "none", False),  # GGUF Q4_0
    IntFormat(4, 64, torch.float16, "int", False),  # AWQ / GPTQ with zero points
    IntFormat(8, 32, torch.float16, "none", False),  # GGUF Q8_0
    IntFormat(8, 0, torch.float16, "none", False),  # RTN int8 per channel
    IntFormat(8, 64, torch.float16, "int", False),
    IntFormat(8, 16, torch.float32, "none", False),  # GGUF Q6_K: groups of 16
    IntFormat(4, 16, torch.float32, "int", False),  # groups of 16 with zero points
]


@native
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"int{f.bits}-g{f.group_size}-{f.zero}")
def test_native_layout_multiplies_like_the_dequantized_weight(fmt: IntFormat) -> None:
    w = torch.randn(2, 64, 128, generator=_gen(fmt.bits + fmt.group_size)) * 0.05  # [E, N, K]
    t = quantize_rtn(w, fmt)
    native = int_cpu.prepare_cpu(t, torch.bfloat16, "native")
    key = "cpu_n4" if fmt.bits == 4 else "cpu_n8"
    assert key in native and "qweight" not in native and int_cpu.is_packed(native)
    assert ("cpu_nz" in native) == (fmt.zero != "none")
    x = torch.randn(3, 128, generator=_gen(7)).bfloat16()
    for e in range(2):
        want = x.float() @ dequantize({k: v[e] for k, v in t.items()}, torch.float32).t()
        got = int_cpu.cpu_linear(x, native, e).float()
        assert float((got - want).norm() / want.norm()) < 0.015


@native
def test_act_order_columns_are_permuted_before_the_kernel() -> None:
    fmt = IntFormat(4, 32, torch.float16, "int", True)
    w = torch.randn(32, 128, generator=_gen(3)) * 0.05
    t = quantize_rtn(w, IntFormat(4, 32, torch.float16, "int", False))
    # Stored column j holds logical column perm[j] (groups contiguous in stored order): any perm over these codes.
    t = {**t, "perm": torch.randperm(128, generator=_gen(4)).to(torch.int32)}
    assert IntFormat.of(t) == fmt
    native = int_cpu.prepare_cpu(t, torch.bfloat16, "native")
    x = torch.randn(2, 128, generator=_gen(5)).bfloat16()
    want = x.float() @ dequantize(t, torch.float32).t()
    got = int_cpu.cpu_linear(x, native).float()
    assert "perm" in native and float((got - want).norm() / want.norm()) < 0.015


def test_packed_choice_and_unfit_shapes_keep_the_packed_layouts() -> None:
    t = quantize_rtn(torch.randn(64, 128) * 0.05, IntFormat(4, 32, torch.float16, "none", False))
    assert set(int_cpu.prepare_cpu(t, torch.bfloat16, "packed")) == {"cpu_q4", "cpu_sz"}
    # fp16 activations: the kernel reads bf16 only.
    assert "cpu_q4" in int_cpu.prepare_cpu(t, torch.float16, "native")
    # N not a multiple of the kernel's 16-channel tiles.
    t40 = quantize_rtn(torch.randn(40, 128) * 0.05, IntFormat(8, 32, torch.float16, "none", False))
    assert not any(k in int_cpu.prepare_cpu(t40, torch.bfloat16, "native") for k in ("cpu_n4", "cpu_n8"))


def test_auto_falls_back_to_packed_where_the_kernel_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(int_cpu, "native_int_dot", lambda: None)
    t = quantize_rtn(torch.randn(64, 128) * 0.05, IntFormat(8, 32, torch.float16, "none", False))
    assert set(int_cpu.prepare_cpu(t, torch.bfloat16, "auto")) == {"cpu_q8x2", "cpu_sz"}


def test_native_asked_for_where_it_cannot_run_fails_before_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_native, "native_unavailable", lambda: "this CPU lacks avx512_vnni")
    with pytest.raises(ValueError, match=r"cpu_int_kernel 'native'.*lacks avx512_vnni.*'auto' or 'packed'"):
        require_cpu_int_kernel(KernelConfig(cpu_int_kernel="native"), "cpu")
    require_cpu_int_kernel(KernelConfig(cpu_int_kernel="auto"), "cpu")  # auto never refuses
    require_cpu_int_kernel(KernelConfig(cpu_int_kernel="native"), "meta")  # only CPU weights need it
    with pytest.raises(ValueError, match="cpu_int_kernel='fast' is not one of auto, native, packed"):
        KernelConfig(cpu_int_kernel="fast")


def test_a_failing_build_is_a_reason_not_a_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiler that fails leaves no library behind and says what it printed."""
    bad = tmp_path / "cc"
    bad.write_text("#!/bin/sh\necho 'cc: error: unrecognized option -mavx512vnni' >&2\nexit 1\n")
    bad.chmod(0o755)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_native, "SOURCES", (tmp_path / "int_dot.c",))
    (tmp_path / "int_dot.c").write_text("/* a source no earlier build has seen */\n")
    with pytest.raises(RuntimeError, match="unrecognized option -mavx512vnni"):
        cpu_native._build(str(bad))
    assert list((tmp_path / "cache" / "mixtral" / "native").iterdir()) == []


@native
def test_the_build_is_cached_under_xdg_cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    compiler = subprocess.run(["sh", "-c", "command -v cc || command -v gcc"], capture_output=True, text=True)
    avx2 = VARIANTS[-1]
    lib = cpu_native._build(compiler.stdout.strip(), avx2)
    assert lib.parent == tmp_path / "mixtral" / "native" and lib.name.startswith("int_dot-avx2-")
    mtime = lib.stat().st_mtime_ns
    assert cpu_native._build("/nonexistent/cc", avx2) == lib and lib.stat().st_mtime_ns == mtime  # not rebuilt
    assert cpu_native._self_check(cpu_native._load(lib)) is None


@native
def test_the_best_build_this_cpu_runs_is_the_one_taken() -> None:
    """With a compiler, every build whose flags the CPU has loads and passes its self-check; auto takes the
    first of VARIANTS (AVX512-VNNI before AVX2)."""
    runs = [v.name for v in VARIANTS if set(v.cpu_flags) <= cpu_flags()]
    assert [v.name for v in VARIANTS if load_variant(v.name) is not None] == runs
    assert native_variant() == runs[0] and cpu_native.native_unavailable() is None


def test_a_cpu_without_the_flags_gets_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_native, "cpu_flags", lambda: {"sse2", "avx"})
    monkeypatch.setattr(cpu_native, "_reason", {})
    for v in VARIANTS:
        assert cpu_native.load_variant.__wrapped__(v.name) is None  # uncached: this process's answer stays
    assert cpu_native._reason == {"avx512_vnni": "this CPU lacks avx512f, avx512bw, avx512vl, avx512_vnni",
                                  "avx_vnni": "this CPU lacks avx2, fma, avx_vnni", "avx2": "this CPU lacks avx2, fma"}


@native
def test_mismatched_operands_are_refused_not_read_out_of_bounds() -> None:
    codes = torch.randint(0, 16, (32, 64), generator=_gen(2), dtype=torch.uint8)
    w, s = pack_codes(codes, 4), tile_scales(torch.ones(32, 2).bfloat16())
    x = torch.randn(1, 64).bfloat16()
    assert int_dot_matmul(x, w, 4, 32, s, None, 32).shape == (1, 32)
    for bad in ((x.float(), w, 4, 32, s, None, 32), (torch.randn(1, 96).bfloat16(), w, 4, 32, s, None, 32),
                (x, w, 8, 32, s, None, 32), (x, w, 4, 64, s, None, 32), (x, w, 4, 32, s, s[:1], 32),
                (x, w, 4, 32, s, None, 48), (torch.randn(64, 2).bfloat16().t(), w, 4, 32, s, None, 32)):
        with pytest.raises(ValueError, match="do not fit"):
            int_dot_matmul(*bad)


# ----------------------------------------------------------------------------------------------- the bf16 GEMV
@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("threads", [1, 2])
def test_bf16_gemv_is_the_fp32_product_rounded_once(build: str, threads: int,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Against the fp32 product of the bf16 operands: within one bf16 rounding (and the fp32 sums' order), for
    N with partial passes of weight rows (N % 4 = 1, 2, 3) and K of one step or many."""
    lib = load_variant(build)
    assert lib is not None
    monkeypatch.setattr(cpu_native, "PARALLEL_MIN", 0)  # the threaded path even on these small shapes
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = _gen(11)
        for n, k, m in ((37, 64, 1), (34, 32, 3), (35, 320, 2), (64, 1024, 5)):
            x, w = torch.randn(m, k, generator=g).bfloat16(), torch.randn(n, k, generator=g).bfloat16()
            got = cpu_native.bf16_gemv(x, w, lib)
            want = x.float() @ w.float().t()
            assert got.dtype == torch.bfloat16 and got.shape == (m, n)
            torch.testing.assert_close(got.float(), want, rtol=2 ** -8, atol=1e-5 * float(want.abs().max()) + 1e-6)
            # a row's result does not depend on the other rows
            assert torch.equal(cpu_native.bf16_gemv(x[-1:].contiguous(), w, lib), got[-1:])
    finally:
        torch.set_num_threads(before)


@native
def test_bf16_gemv_refuses_what_it_cannot_read() -> None:
    w = torch.randn(8, 64).bfloat16()
    for x, wt in ((torch.randn(1, 64), w), (torch.randn(1, 48).bfloat16(), torch.randn(8, 48).bfloat16()),
                  (torch.randn(1, 64).bfloat16(), w.t().contiguous().t()), (torch.randn(1, 32).bfloat16(), w)):
        with pytest.raises(ValueError, match="do not fit"):
            cpu_native.bf16_gemv(x, wt)
