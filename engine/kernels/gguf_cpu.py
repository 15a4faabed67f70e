"""GGUF block-quantized products on the CPU: `gguf_cpu.cpp`, compiled on first use.

The C++ source is built once per machine (for its own SIMD: `-march=native`, or
`-mcpu=native` on ARM; `LIGHTGATE_KERNEL_MARCH` names another target, e.g. `haswell` for
AVX2 only) with the system's C++ compiler against the installed torch, and the
shared library is cached under `~/.cache/lightgate/kernels/` (`LIGHTGATE_KERNEL_CACHE`
overrides), keyed by the source, the torch version, the compiler and the CPU; later processes
load it at once. The library registers the ops `torch.ops.lightgate_gguf.mm`, `.mm_bf16`,
`.has_int8_activations` and `.dequantize`, and the decode step's ops of
`engine.kernels.cpu_decode` (`torch.ops.lightgate_cpu`). Where no compiler is found or the build fails,
`available()` is False and GGUF weights are served dequantized instead.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile

import torch

logger = logging.getLogger(__name__)

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gguf_cpu.cpp")
# ggml type ids with a kernel: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K
SUPPORTED_TYPES = frozenset({2, 3, 6, 7, 8, 12, 13, 14})
# The K-quants (Q4_K, Q5_K, Q6_K): their float32 kernels are bound by decoding, not by memory.
K_QUANT_TYPES = frozenset({12, 13, 14})
# Activation rows up to which the block kernel runs; more rows take a dequantized GEMM.
MAX_DIRECT_ROWS = 64


def _cache_root() -> str:
    default = os.path.join(os.path.expanduser("~"), ".cache", "lightgate", "kernels")
    return os.environ.get("LIGHTGATE_KERNEL_CACHE", default)


def _cpu_signature() -> str:
    """What `-march=native` sees: the CPU's model and feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("flags", "Features", "model name", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _compile_command(compiler: str, output: str) -> list[str]:
    from torch.utils.cpp_extension import include_paths, library_paths

    target = os.environ.get("LIGHTGATE_KERNEL_MARCH", "native")
    arch = f"-mcpu={target}" if platform.machine() in ("aarch64", "arm64") else f"-march={target}"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    libs = library_paths()
    return [
        compiler, "-O3", arch, "-fopenmp", "-shared", "-fPIC", "-std=c++17", "-w",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *(f"-I{p}" for p in include_paths()),
        f"-I{sysconfig.get_paths()['include']}",
        _SOURCE, "-o", output,
        *(f"-L{p}" for p in libs), *(f"-Wl,-rpath,{p}" for p in libs),
        "-lc10", "-ltorch_cpu", "-ltorch",
    ]  # fmt: skip


def _build(compiler: str) -> str:
    with open(_SOURCE, "rb") as f:
        source = f.read()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(b"|".join(
        [source, torch.__version__.encode(), version.encode(), _cpu_signature().encode(),
         os.environ.get("LIGHTGATE_KERNEL_MARCH", "native").encode()]
    )).hexdigest()[:16]  # fmt: skip
    directory = os.path.join(_cache_root(), f"gguf_cpu-{key}")
    library = os.path.join(directory, "gguf_cpu.so")
    if os.path.isfile(library):
        return library
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
    os.close(fd)
    try:
        logger.info("compiling the GGUF CPU kernels (once per machine)")
        result = subprocess.run(_compile_command(compiler, tmp), capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"building {_SOURCE} failed:\n{result.stderr[-4000:]}")
        os.replace(tmp, library)  # atomic: a concurrent process sees all of it or nothing
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return library


_errors: list[str] = []


def build_error() -> str | None:
    """Why `available()` is False (the compiler's complaint), or None."""
    return _errors[-1] if _errors else None


@functools.cache
def available() -> bool:
    """Build (once) and load the kernels; False where that is not possible here."""
    if hasattr(torch.ops, "lightgate_gguf") and hasattr(torch.ops.lightgate_gguf, "mm"):
        return True
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if compiler is None:
        _errors.append("no C++ compiler found (g++, c++, clang++ or $CXX)")
        logger.warning("%s: GGUF weights are served dequantized", _errors[-1])
        return False
    try:
        torch.ops.load_library(_build(compiler))
    except (OSError, RuntimeError) as e:
        _errors.append(str(e))
        logger.warning("GGUF CPU kernels unavailable, weights are served dequantized: %s", e)
        return False
    return True


@functools.cache
def has_int8_activations() -> bool:
    """Whether the kernels built here have the int8-activation path (x86 with AVX2: AVX-512 VNNI,
    AVX-VNNI or AVX2 code); without it an int8 product is the float32 one."""
    return available() and bool(torch.ops.lightgate_gguf.has_int8_activations())


def int8_types(activations: str) -> frozenset[int]:
    """The ggml types whose decode products take int8 activations under the `gguf_activations`
    setting: none for "float32" or where `has_int8_activations()` is False, every supported type
    for "int8", the K-quants for "auto" (the 32-value formats' float32 kernels already run near
    memory speed for one row, and keep their products exact)."""
    if activations not in ("auto", "int8", "float32"):
        raise ValueError(f"gguf_activations must be auto, int8 or float32, got {activations!r}")
    if activations == "float32" or not has_int8_activations():
        return frozenset()
    return SUPPORTED_TYPES if activations == "int8" else K_QUANT_TYPES


def gguf_mm(x: torch.Tensor, weight: torch.Tensor, qtype: int, int8_activations: bool = False) -> torch.Tensor:
    """x [M, K] float32 @ the GGUF weight [N, bytes per row] of `qtype`, transposed -> [M, N].

    With `int8_activations` (and `has_int8_activations()`), up to `MAX_DIRECT_ROWS` rows of x are
    quantized per row and weight block (32 values, 256 for the K-quants: scale max|x| / 127,
    rounded to nearest, ties to even) and multiplied in integers: the product of the dequantized
    weight with those dequantized activations, up to float32 summation order. Otherwise the
    product with x as it is, up to float32 summation order."""
    return torch.ops.lightgate_gguf.mm(x, weight, qtype, MAX_DIRECT_ROWS, int8_activations)


def gguf_mm_bf16(x: torch.Tensor, weight: torch.Tensor, qtype: int) -> torch.Tensor:
    """x [M, K] bfloat16 @ the GGUF weight dequantized and rounded to bfloat16, transposed ->
    float32 [M, N] (bfloat16 products summed in float32, the sums rounded to bfloat16)."""
    return torch.ops.lightgate_gguf.mm_bf16(x, weight, qtype)


def gguf_dequantize(weight: torch.Tensor, qtype: int, columns: int) -> torch.Tensor:
    """The GGUF weight [N, bytes per row] of `qtype` -> float32 [N, columns]."""
    return torch.ops.lightgate_gguf.dequantize(weight, qtype, columns)
