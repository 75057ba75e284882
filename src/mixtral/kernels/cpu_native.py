"""The CPU integer-dot matmul (int_dot.c): built with the machine's C compiler on first use, loaded, checked.

``native_int_dot()`` is the loaded library, or None with ``native_unavailable()`` saying why: a CPU without
AVX512-VNNI (the kernel's one instruction set), no C compiler, a failed build, or a self-check that did not
match the reference. Built once per source version into ``~/.cache/mixtral/native`` (``$XDG_CACHE_HOME`` when
set; a temporary folder when neither is writable): about a second with gcc. The library links the OpenMP
runtime by its soname, so it shares the one PyTorch already loaded (its thread pool, not a second one competing
for the same cores).

``int_dot_matmul(x, w, bits, group, s, z, n)`` is the call (layout and numerics in int_dot.c; quant/int_native.py
packs weights into it). Not here: choosing this path (quant/int_cpu.py, from KernelConfig.cpu_int_kernel).
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
from pathlib import Path

import torch

from mixtral.kernels.config import KernelConfig

SOURCE = Path(__file__).with_name("int_dot.c")
# The instruction sets the kernel is compiled for, and the /proc/cpuinfo flags that say a CPU runs them.
CFLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")

_reason: list[str] = []  # why the last ``native_int_dot()`` is None


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


def _build(compiler: str) -> Path:
    """The shared library for this source and these flags, compiled unless a previous build is there."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode()).hexdigest()[:16]
    for folder in (_cache_dir(), Path(tempfile.gettempdir()) / f"mixtral-native-{os.getuid()}"):
        lib = folder / f"int_dot-{key}.so"
        if lib.exists():
            return lib
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
        except OSError:
            continue
        os.close(fd)
        try:
            done = subprocess.run([compiler, *CFLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True,
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
    return lib


@functools.cache
def native_int_dot() -> ctypes.CDLL | None:
    """The loaded kernel, or None (``native_unavailable()`` says why). Checked once per process."""
    missing = [f for f in CPU_FLAGS if f not in cpu_flags()]
    if not sys.platform.startswith("linux") or missing:
        _reason.append(f"this CPU lacks {', '.join(missing) or 'Linux /proc/cpuinfo'} (the kernel needs AVX512-VNNI)")
        return None
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        _reason.append("no C compiler (cc or gcc) on PATH to build it")
        return None
    try:
        lib = _load(_build(compiler))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        _reason.append(f"building it failed: {exc}")
        return None
    err = _self_check(lib)
    if err is not None:
        _reason.append(err)
        return None
    return lib


def native_unavailable() -> str | None:
    """Why ``native_int_dot()`` is None, or None when it is available."""
    return None if native_int_dot() is not None else _reason[-1]


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
    y = torch.empty(m, n, dtype=torch.bfloat16)
    rc = lib.int_dot_matmul(x.data_ptr(), m, k, n, w.data_ptr(), bits, group, s.data_ptr(),
                            None if z is None else z.data_ptr(), y.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise MemoryError(f"int_dot_matmul could not allocate its int8 activations ({m} x {k})")
    return y


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
    return None
