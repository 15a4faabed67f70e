"""GPU time of a kernel launch sequence, without its launch overhead (benchmarks and the
GPU test tier's timing reports)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def graph_time_ms(fn: Callable[[], object], iters: int = 50) -> float:
    """Milliseconds per call of `fn`, captured once in a CUDA graph and replayed `iters` times
    (the way the engine's decode steps run); `fn` runs once first, to compile its kernels."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters
