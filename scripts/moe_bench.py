"""Fused mixture-of-experts kernel times on the GPU, against the expert weights' read floor.

    python scripts/moe_bench.py [--models mixtral-8x7b,qwen3-30b-a3b] [--tokens 1,8,64,512,4096] [--tp 1]
    TRITON_INTERPRET=1 python scripts/moe_bench.py --device cpu --models tiny --tokens 1,7
        (a check of the script itself, under the CPU interpreter: no graphs, times meaningless)

Random bf16 experts of the model's shape (each expert's width divided by --tp, as one rank of
a tensor-parallel group holds it), random routing; `engine.kernels.fused_moe.fused_experts`
(routing excluded) captured in a CUDA graph and replayed, the way decode steps run. Each row
prints the time, the experts the tokens picked, the bytes of those experts' weights (a step
must read each picked expert once: the floor at --hbm-gbps), and the torch path's eager time
(one product per picked expert) beside it.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from engine.kernels.fused_moe import fused_experts
from engine.kernels.timing import graph_time_ms
from engine.layers.moe import Routing, fused_experts_torch, select_experts

# name -> (experts, top_k, hidden, expert width)
SHAPES = {
    "mixtral-8x7b": (8, 2, 4096, 14336),
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "qwen2-57b-a14b": (64, 8, 3584, 2560),
    "deepseek-v2-lite": (64, 6, 2048, 1408),
    "deepseek-v2": (160, 6, 5120, 1536),
    "tiny": (8, 2, 64, 32),
}


def _eager_ms(fn: Callable[[], object], iters: int) -> float:
    """Wall milliseconds per call, launches included (the torch path synchronises anyway)."""
    fn()
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e3


def bench(model: str, num_tokens: int, tp: int, device: str, hbm_gbps: float, iters: int) -> dict[str, object]:
    num_experts, top_k, hidden, width = SHAPES[model]
    inter = width // tp
    gen = torch.Generator(device=device).manual_seed(num_tokens)
    dtype = torch.bfloat16
    x = torch.randn(num_tokens, hidden, generator=gen, device=device).to(dtype)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=gen, device=device) / hidden**0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, generator=gen, device=device) / inter**0.5).to(dtype)
    logits = torch.randn(num_tokens, num_experts, generator=gen, device=device)
    weights, ids = select_experts(logits, Routing(top_k, renormalize=True))
    picked = int(torch.unique(ids).numel())
    weight_bytes = picked * 3 * hidden * inter * w13.element_size()
    run = lambda: fused_experts(x, w13, w2, weights, ids)  # noqa: E731
    ms = graph_time_ms(run, iters) if device == "cuda" else _eager_ms(run, 1)
    torch_ms = _eager_ms(lambda: fused_experts_torch(x, w13, w2, weights, ids), iters if device == "cuda" else 1)
    floor_ms = weight_bytes / (hbm_gbps * 1e9) * 1e3
    return {
        "model": model, "tp": tp, "tokens": num_tokens, "experts_picked": picked,
        "weight_mb": round(weight_bytes / 1e6, 1), "fused_ms": round(ms, 4), "floor_ms": round(floor_ms, 4),
        "x_floor": round(ms / floor_ms, 2), "torch_eager_ms": round(torch_ms, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mixtral-8x7b,qwen3-30b-a3b")
    parser.add_argument("--tokens", default="1,8,64,512,4096")
    parser.add_argument("--tp", type=int, default=1, help="divide each expert's width, as one rank holds it")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--hbm-gbps", type=float, default=3350.0, help="H100 SXM: 3350; H200: 4800")
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    for model in args.models.split(","):
        for num_tokens in (int(t) for t in args.tokens.split(",")):
            print(json.dumps(bench(model, num_tokens, args.tp, args.device, args.hbm_gbps, args.iters)), flush=True)


if __name__ == "__main__":
    main()
