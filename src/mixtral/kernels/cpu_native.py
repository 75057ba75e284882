"""The native CPU kernels (int_dot.c: int4/int8 weights; bf16_gemv.c: bf16 weights at decode sizes): built with
the machine's C compiler on first use, loaded, checked.

``native_int_dot()`` is the loaded library of the best build this CPU runs (``VARIANTS``: AVX512-VNNI, else
AVX-VNNI, else AVX2 + FMA), or None with ``native_unavailable()`` saying why: a CPU with none of them, not Linux,
no C compiler, a failed build, or a self-check that did not match the reference. Built once per source version
and instruction set into ``~/.cache/mixtral/native`` (``$XDG_CACHE_HOME`` when set; a temporary folder when
neither is writable): about a second with gcc. The library links the OpenMP runtime by its soname, so it shares
the one PyTorch already loaded (its thread pool, not a second one competing for the same cores). A call smaller
than ``PARALLEL_MIN`` multiply-adds runs on one thread: waking the others costs more than it saves.

The calls: ``int_dot_matmul(x, w, bits, group, s, z, n)`` (layout and numerics in int_dot.c; quant/int_native.py
packs weights into it) and ``bf16_gemv(x, w)``. Not here: choosing them (quant/int_cpu.py from
KernelConfig.cpu_int_kernel; kernels/cpu_ops.py ``expert_linear``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from mixtral.kernels.config import KernelConfig

# One library from these sources: the integer-dot matmul and the bf16 GEMV.
SOURCES = (Path(__file__).with_name("int_dot.c"), Path(__file__).with_name("bf16_gemv.c"))
CFLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp")


@dataclass(frozen=True)
class Variant:
    """One build of int_dot.c: its compiler flags and the /proc/cpuinfo flags a CPU needs to run it."""

    name: str
    cflags: tuple[str, ...]
    cpu_flags: tuple[str, ...]


# Best first: AVX512-VNNI multiplies 64 u8 x s8 pairs an instruction, AVX-VNNI 32 in one, AVX2 32 in two
# (vpmaddubsw, vpmaddwd).
VARIANTS = (
    Variant("avx512_vnni", ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma"),
            ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")),
    Variant("avx_vnni", ("-mavx2", "-mfma", "-mavxvnni"), ("avx2", "fma", "avx_vnni")),
    Variant("avx2", ("-mavx2", "-mfma"), ("avx2", "fma")),
)
_reason: dict[str, str] = {}  # variant name -> why it is not available
# Below this many multiply-adds a call runs on one thread. Measured at M = 1 on this project's 2-core host, one
# thread against two: 640 x 192 (2^17) bf16 GEMV 6.2 / 4.9 us, int4 4.4 / 4.3; 192 x 320 (2^16) 4.4 / 4.1 and
# 4.1 / 4.2; from 2^18 two threads win by 1.5-1.8x.
PARALLEL_MIN = 1 << 16


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mixtral" / "native"


def _build(compiler: str, variant: Variant = VARIANTS[0]) -> Path:
    """The shared library of ``variant`` for this source, compiled unless a previous build is there."""
    flags = (*CFLAGS, *variant.cflags)
    key = hashlib.sha256(b"".join(f.read_bytes() for f in SOURCES) + " ".join(flags).encode()).hexdigest()[:16]
    for folder in (_cache_dir(), Path(tempfile.gettempdir()) / f"mixtral-native-{os.getuid()}"):
        lib = folder / f"int_dot-{variant.name}-{key}.so"
        if lib.exists():
            return lib
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
        except OSError:
            continue
        os.close(fd)
        try:
            done = subprocess.run([compiler, *flags, "-o", tmp, *map(str, SOURCES)], capture_output=True, text=True,
                                  timeout=120)
            if done.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
            os.replace(tmp, lib)  # atomic: a process loading it never sees half a file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return lib
    raise RuntimeError(f"no writable folder for the build ({_cache_dir()} or the temporary folder)")


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.int_dot_matmul.argtypes = [p, i64, i64, i64, p, c_int, i64, p, p, p, c_int]
    lib.int_dot_matmul.restype = c_int
    lib.bf16_gemv.argtypes = [p, i64, i64, p, i64, p, c_int]
    lib.bf16_gemv.restype = None
    return lib


@functools.cache
def load_variant(name: str) -> ctypes.CDLL | None:
    """The build ``name`` of VARIANTS, loaded and self-checked, or None (``_reason[name]`` says why). Once per
    process."""
    variant = next(v for v in VARIANTS if v.name == name)
    missing = [f for f in variant.cpu_flags if f not in cpu_flags()]
    if not sys.platform.startswith("linux") or missing:
        _reason[name] = f"this CPU lacks {', '.join(missing) or 'Linux /proc/cpuinfo'}"
        return None
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        _reason[name] = "no C compiler (cc or gcc) on PATH to build it"
        return None
    try:
        lib = _load(_build(compiler, variant))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        _reason[name] = f"building it failed: {exc}"
        return None
    err = _self_check(lib)
    if err is not None:
        _reason[name] = err
    return lib if err is None else None


@functools.cache
def native_variant() -> str | None:
    """The name of the best build that runs here, or None."""
    return next((v.name for v in VARIANTS if load_variant(v.name) is not None), None)


def native_int_dot() -> ctypes.CDLL | None:
    """The loaded kernel of the best build that runs here, or None (``native_unavailable()`` says why)."""
    name = native_variant()
    return None if name is None else load_variant(name)


def native_unavailable() -> str | None:
    """Why ``native_int_dot()`` is None, or None when it is available."""
    if native_variant() is not None:
        return None
    return "; ".join(f"{v.name}: {_reason[v.name]}" for v in VARIANTS if v.name in _reason)


def require_cpu_int_kernel(config: KernelConfig, device: torch.device | str) -> None:
    """A clear error, before a model is loaded on a CPU, when ``config`` asks for the native kernel and it cannot
    run here (``auto`` falls back to PyTorch's packed matmuls instead)."""
    if config.cpu_int_kernel == "native" and torch.device(device).type == "cpu":
        reason = native_unavailable()
        if reason is not None:
            raise ValueError(f"cpu_int_kernel 'native' (--cpu-int-kernel native) cannot run here: {reason}; "
                             "choose 'auto' or 'packed'")


def int_dot_matmul(x: torch.Tensor, w: torch.Tensor, bits: int, group: int, s: torch.Tensor,
                   z: torch.Tensor | None, n: int, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x [M, K] bf16 contiguous @ the packed weight w (uint8, int_dot.c's layout, [N / 16, ...]) with bf16 scales
    s (and offsets z) [N / 16, K / group, 16] -> y [M, N] bf16."""
    lib = lib or native_int_dot()
    assert lib is not None, "int_dot_matmul called without the native kernel"
    m, k = x.shape
    # The C code trusts its pointers: a mismatch here would read out of bounds, so it is refused (~1 us a call).
    if (x.dtype != torch.bfloat16 or not x.is_contiguous() or w.shape != (n // 16, k * 16 * bits // 8)
            or s.shape != (n // 16, k // group, 16) or (z is not None and z.shape != s.shape) or k % group
            or group % 16 or k % 32 or n % 16 or not (w.is_contiguous() and s.is_contiguous())):
        raise ValueError(f"int_dot_matmul: x {tuple(x.shape)} {x.dtype}, weight {tuple(w.shape)}, scales "
                         f"{tuple(s.shape)} do not fit int{bits}, group {group}, N {n}")
    y = torch.empty(m, n, dtype=torch.bfloat16)
    rc = lib.int_dot_matmul(x.data_ptr(), m, k, n, w.data_ptr(), bits, group, s.data_ptr(),
                            None if z is None else z.data_ptr(), y.data_ptr(), _threads(m * n * k))
    if rc != 0:
        raise MemoryError(f"int_dot_matmul could not allocate its int8 activations ({m} x {k})")
    return y


def bf16_gemv(x: torch.Tensor, w: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x [M, K] bf16 @ w [N, K]^T bf16 (both contiguous, K % 32 == 0) -> y [M, N] bf16: fp32 sums, one rounding."""
    lib = lib or native_int_dot()
    assert lib is not None, "bf16_gemv called without the native kernels"
    (m, k), n = x.shape, w.shape[0]
    if (x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16 or w.shape[1] != k or k % 32
            or not (x.is_contiguous() and w.is_contiguous())):
        raise ValueError(f"bf16_gemv: x {tuple(x.shape)} {x.dtype} and weight {tuple(w.shape)} {w.dtype} do not fit "
                         "(bf16, contiguous, K a multiple of 32)")
    y = torch.empty(m, n, dtype=torch.bfloat16)
    lib.bf16_gemv(x.data_ptr(), m, k, w.data_ptr(), n, y.data_ptr(), _threads(m * n * k))
    return y


def _threads(macs: int) -> int:
    return torch.get_num_threads() if macs >= PARALLEL_MIN else 1


def _self_check(lib: ctypes.CDLL) -> str | None:
    """Multiplies small int4 and int8 weights (with offsets, 2 rows) and compares with fp32; an error text when the
    built kernel disagrees (a miscompile, a layout the Python side packs differently)."""
    from mixtral.quant.int_native import pack_codes, tile_scales

    gen = torch.Generator().manual_seed(0)
    n, k, group = 32, 128, 64
    x = torch.randn(2, k, generator=gen).bfloat16()
    for bits in (4, 8):
        codes = torch.randint(0, 1 << bits, (n, k), generator=gen, dtype=torch.uint8)
        s = (torch.rand(n, k // group, generator=gen) + 0.5).bfloat16()
        z = torch.randn(n, k // group, generator=gen).bfloat16()
        off = 8 if bits == 4 else 128
        w = (codes.float() - off).view(n, -1, group) * s.float()[..., None] + z.float()[..., None]
        want = x.float() @ w.view(n, k).t()
        got = int_dot_matmul(x, pack_codes(codes, bits), bits, group, tile_scales(s), tile_scales(z), n, lib)
        err = float((got.float() - want).norm() / want.norm())
        if not err < 0.02:  # int8 activations: ~0.005
            return f"its self-check failed (int{bits}: relative error {err:.3g} against fp32)"
    w = torch.randn(n + 3, k, generator=gen).bfloat16()  # a partial pass of weight rows too
    got = bf16_gemv(x, w, lib)
    want = x.float() @ w.float().t()
    if not torch.allclose(got.float(), want, rtol=2 ** -7, atol=1e-3 * float(want.abs().max())):
        return "its self-check failed (bf16 GEMV against fp32)"
    return None
