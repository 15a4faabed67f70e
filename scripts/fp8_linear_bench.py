"""FP8 linear layers against bf16 on the GPU, at an 8B model's shapes, by token count.

    python scripts/fp8_linear_bench.py [--tokens 1,16,128,1024,4096] [--hbm-gbps 3350]

For each of a Llama-3-8B layer's four products (fused q/k/v, output, fused gate/up, down) and
each token count: the bf16 product (`F.linear`), the whole FP8 linear (`fp8_linear`: activation
quantization + `torch._scaled_mm`), its two parts alone (the Triton quantization kernel, the
plain-torch one, the scaled product), and the weight-read floor of each dtype at --hbm-gbps.
Every time is a CUDA graph replay (as decode steps run). The last rows sum a whole model's
32 layers: the linear layers' share of a step.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from engine.kernels.fp8_quant import quantize_fp8_rows_triton
from engine.kernels.timing import graph_time_ms
from engine.layers.fp8 import fp8_linear, quantize_fp8_rows

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
LAYERS = 32


def _row(name: str, tokens: int, k: int, n: int, hbm: float) -> dict[str, float]:
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
    wq, ws = quantize_fp8_rows(w)
    xq, xs = quantize_fp8_rows_triton(x)
    times = {
        "bf16": graph_time_ms(lambda: F.linear(x, w)),
        "fp8": graph_time_ms(lambda: fp8_linear(x, wq, ws, None)),
        "quant_triton": graph_time_ms(lambda: quantize_fp8_rows_triton(x)),
        "quant_torch": graph_time_ms(lambda: quantize_fp8_rows(x)),
        "scaled_mm": graph_time_ms(
            lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.t(), out_dtype=torch.bfloat16)),
        "floor_bf16": n * k * 2 / hbm * 1e3,
        "floor_fp8": n * k / hbm * 1e3,
    }
    print(f"{name:8s} {tokens:6d} " + " ".join(f"{v:12.4f}" for v in times.values()), flush=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="1,16,128,1024,4096")
    parser.add_argument("--hbm-gbps", type=float, default=3350.0, help="H100 SXM: 3350")
    args = parser.parse_args()
    hbm = args.hbm_gbps * 1e9
    print(torch.cuda.get_device_name(), "times in ms")
    header = ["bf16", "fp8", "quant_triton", "quant_torch", "scaled_mm", "floor_bf16", "floor_fp8"]
    print(f"{'product':8s} {'tokens':>6s} " + " ".join(f"{h:>12s}" for h in header))
    totals: dict[int, dict[str, float]] = {}
    for tokens in (int(t) for t in args.tokens.split(",")):
        for name, (k, n) in SHAPES.items():
            row = _row(name, tokens, k, n, hbm)
            total = totals.setdefault(tokens, dict.fromkeys(header, 0.0))
            for key in header:
                total[key] += row[key] * LAYERS
    print(f"\nall {LAYERS} layers' linear products, ms per step")
    for tokens, total in totals.items():
        print(f"{'model':8s} {tokens:6d} " + " ".join(f"{v:12.3f}" for v in total.values()))


if __name__ == "__main__":
    main()
