"""Micro-benchmark: one projection's product on the CPU, GGUF block kernels (float32 and int8
activations) against the dense and torch-quantized paths the engine has (fp32 / bf16 packed,
int8 / int4 weight-only).

    PYTHONPATH=. .venv/bin/python scripts/gguf_cpu_bench.py --out 8192 --in 2048 --rows 1 4 16
    PYTHONPATH=. .venv/bin/python scripts/gguf_cpu_bench.py --rows 1 4 16 64 --gguf-only --weights-mb 256

Prints the best time of a product per path and row count, with the weight's bytes. With
`--weights-mb`, each GGUF path cycles through distinct weights of that many MB in all (more than
the last-level cache: each product reads its weight from memory) and also prints the weight
bytes read per second.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import gguf
import numpy as np
import torch

from engine.kernels import gguf_cpu
from engine.layers import cpu_gemm

QT = gguf.GGMLQuantizationType
TYPES = [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K]


def random_blocks(qtype: QT, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Valid blocks of `qtype` (random codes, small positive scales) as uint8 [rows, bytes]."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    scale = (rng.random((rows, cols // block, 2)) * 0.01).astype(np.float16).view(np.uint8)
    if qtype == QT.Q6_K:
        raw[..., 208:210] = scale[..., 0:2]
    else:
        raw[..., 0:4] = scale.reshape(rows, cols // block, 4)
    return raw.reshape(rows, -1)


def best_ms(fn: Callable[[], object], seconds: float) -> float:
    fn()
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times)  # the least disturbed run: the machine is shared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=int, default=8192)
    parser.add_argument("--in", dest="inp", type=int, default=2048)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=0.5, help="per measurement")
    parser.add_argument("--weights-mb", type=float, default=0.0, help="GGUF: cycle through weights of this many MB")
    parser.add_argument("--gguf-only", action="store_true", help="only the GGUF block kernels")
    args = parser.parse_args()
    assert gguf_cpu.available(), "the GGUF CPU kernels did not build"
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    n, k = args.out, args.inp
    w32 = torch.randn(n, k) * 0.02
    w16 = w32.to(torch.bfloat16)
    int8 = cpu_gemm.quantize_weight(w16, "int8")[0]
    int4 = cpu_gemm.quantize_weight(w16, "int4")[0]
    paths: dict[str, tuple[int, Callable[[torch.Tensor], object]]] = {
        "fp32 packed": (w32.nbytes, lambda x, p=cpu_gemm.pack_weight(w32): cpu_gemm.packed_linear(x, p, None)),
        "bf16 packed": (w16.nbytes, lambda x, p=cpu_gemm.pack_weight(w16): cpu_gemm.packed_linear(x.bfloat16(), p, None)),
        "int8 (torch)": (int8.qweight.nbytes + int8.scales.nbytes, lambda x: int8(x.bfloat16(), None)),
        "int4 (torch)": (int4.qweight.nbytes + int4.scales.nbytes, lambda x: int4(x.bfloat16(), None)),
    }  # fmt: skip
    if args.gguf_only:
        paths.clear()
    print(f"weight [{n}, {k}], {torch.get_num_threads()} threads; best ms per product", end="")
    print(" (GB/s of weight read), distinct weights cycled" if args.weights_mb else "")
    print(f"{'path':<20} {'MB':>6} " + " ".join(f"{f'M={m}':>14}" for m in args.rows))
    for name, (nbytes, fn) in paths.items():
        print_row(name, nbytes, fn, args, rate=False)
    for qtype in TYPES:  # one type's weights in memory at a time
        copies = [torch.from_numpy(random_blocks(qtype, n, k, rng))]
        while len(copies) * copies[0].nbytes < args.weights_mb * 1e6:
            copies.append(torch.from_numpy(random_blocks(qtype, n, k, rng)))
        for activations in ("float32", "int8"):
            fn = cycling(copies, int(qtype), activations == "int8")
            print_row(f"gguf {qtype.name} {activations}", copies[0].nbytes, fn, args, rate=bool(args.weights_mb))


def print_row(name: str, nbytes: int, fn: Callable[[torch.Tensor], object], args: argparse.Namespace, rate: bool) -> None:
    cells = []
    for m in args.rows:
        x = torch.randn(m, args.inp)
        ms = best_ms(lambda x=x: fn(x), args.seconds)
        cells.append(f"{ms:7.3f} ({nbytes / ms / 1e6:4.1f})" if rate else f"{ms:14.3f}")
    print(f"{name:<20} {nbytes / 1e6:6.1f} " + " ".join(cells), flush=True)


def cycling(copies: list[torch.Tensor], qtype: int, int8: bool) -> Callable[[torch.Tensor], object]:
    """A product with the next of `copies` at each call."""
    turn = [0]

    def product(x: torch.Tensor) -> object:
        turn[0] = (turn[0] + 1) % len(copies)
        return torch.ops.lightgate_gguf.mm(x, copies[turn[0]], qtype, gguf_cpu.MAX_DIRECT_ROWS, int8)

    return product


if __name__ == "__main__":
    main()
