"""FP8 linear layers against bf16 on the GPU, at an 8B model's shapes, by token count.

    python scripts/fp8_linear_bench.py [--tokens 1,4,8,16,128,1024,4096] [--hbm-gbps 3350]
                                       [--sweep [--sweep-tokens 1,8] [--sweep-jobs 16]]

For each of a Llama-3-8B layer's four products (fused q/k/v, output, fused gate/up, down) and
each token count: the bf16 product (`F.linear`), the whole FP8 linear (`fp8_linear`: activation
quantization + `torch._scaled_mm`), its two parts alone (the Triton quantization kernel, the
plain-torch one, the scaled product), the decode GEMV of `engine.kernels.gemv` for bf16 and FP8
weights (up to its MAX_ROWS rows; the `decode_gemv` setting's path), and the weight-read floor of
each dtype at --hbm-gbps. Every time is a CUDA graph replay (as decode steps run). The last rows
sum a whole model's 32 layers: the linear layers' share of a step.

`--sweep` first times the GEMV's launch settings (BLOCK_N, BLOCK_K, SPLIT_K, warps; the best split
ones again with the last split adding the partials instead of a second launch) per
product, weight kind and --sweep-tokens row count, prints the best ones against the default rule
and the floor, then the `_TUNED` entries to keep in engine/kernels/gemv.py; the table that follows
uses them. Its few hundred kernels are compiled first by --sweep-jobs processes (Triton's cache on
disk carries them to the timing process).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import itertools
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn.functional as F

from engine.kernels import gemv as gemv_module
from engine.kernels.fp8_quant import quantize_fp8_rows_triton
from engine.kernels.gemv import MAX_ROWS, GemvLaunch, fp8_gemv, gemv, launch_for, table_key
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
        "gemv_bf16": graph_time_ms(lambda: gemv(x, w)) if tokens <= MAX_ROWS else math.nan,
        "gemv_fp8": graph_time_ms(lambda: fp8_gemv(x, wq, ws)) if tokens <= MAX_ROWS else math.nan,
        "floor_bf16": n * k * 2 / hbm * 1e3,
        "floor_fp8": n * k / hbm * 1e3,
    }
    print(f"{name:8s} {tokens:6d} " + " ".join(f"{v:12.4f}" for v in times.values()), flush=True)
    return times


def _launches(rows: int) -> list[GemvLaunch]:
    """The sweep's candidates: a tile row across every thread with 4, 8 or 16 contiguous inputs
    each, 2-32 weight rows per tile (at most 64 accumulator values a thread), 4 or 8 warps, K
    split 1-16 ways."""
    block_m = 1 << (rows - 1).bit_length()
    grid = itertools.product((2, 4, 8, 16, 32), (4, 8, 16), (4, 8), (1, 2, 4, 8, 16))
    return [GemvLaunch(bn, vec * 32 * warps, split, warps) for bn, vec, warps, split in grid if block_m * bn <= 64]


def _candidates(rows: int, n: int, k: int, fp8: bool) -> list[GemvLaunch]:
    """The engine's current launch, then the grid's."""
    return list(dict.fromkeys([launch_for(rows, n, k, fp8, torch.device("cuda")), *_launches(rows)]))


def _compile_job(job: tuple[int, int, int, bool, tuple[GemvLaunch, ...]]) -> None:
    """Run each launch once in this (spawned) process: its kernels compile into Triton's cache on
    disk, where the timing process finds them."""
    rows, n, k, fp8, launches = job
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    w = torch.zeros(n, k, device="cuda", dtype=torch.float8_e4m3fn if fp8 else torch.bfloat16)
    ws = torch.ones(n, 1, device="cuda")
    for launch in launches:
        with contextlib.suppress(Exception):  # a launch the GPU cannot take: the sweep reports it
            _ = fp8_gemv(x, w, ws, None, launch) if fp8 else gemv(x, w, None, launch)
    torch.cuda.synchronize()


def _compile_ahead(tokens: list[int], jobs: int) -> None:
    """Compile every candidate (and each split one's last_finishes twin) in `jobs` processes
    first: a few hundred kernels, about a second each on one core."""
    work = []
    for rows, (k, n), fp8 in itertools.product(tokens, SHAPES.values(), (False, True)):
        launches = _candidates(rows, n, k, fp8)
        launches += [dataclasses.replace(launch, last_finishes=True) for launch in launches if launch.split_k > 1]
        work += [(rows, n, k, fp8, tuple(launches[i : i + 8])) for i in range(0, len(launches), 8)]
    start = time.perf_counter()
    try:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_compile_job, work))
    except Exception as exc:  # e.g. a GPU in exclusive-process mode: the sweep compiles as it goes
        print(f"compiling ahead failed ({type(exc).__name__}: {exc}); compiling in the sweep", flush=True)
        return
    print(f"compiled the sweep's launches in {jobs} processes: {time.perf_counter() - start:.0f} s", flush=True)


def _sweep_product(name: str, rows: int, n: int, k: int, fp8: bool, hbm: float) -> tuple[GemvLaunch, float]:
    """Every candidate launch of one product; prints the best three; returns the best."""
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    wq, ws = quantize_fp8_rows(w)
    current = launch_for(rows, n, k, fp8, x.device)
    times: dict[GemvLaunch, float] = {}

    def time_launches(launches: list[GemvLaunch]) -> None:
        for launch in launches:
            product = functools.partial(fp8_gemv, x, wq, ws, None, launch) if fp8 else functools.partial(
                gemv, x, w, None, launch)
            try:
                times[launch] = graph_time_ms(product, iters=30)
            except Exception as exc:  # a launch the GPU cannot take (registers, shared memory)
                print(f"  {name} {rows} {launch}: {type(exc).__name__}", flush=True)

    time_launches(_candidates(rows, n, k, fp8))
    # The best split launches again with the last split adding the partials (one launch, not two).
    split = [launch for launch in sorted(times, key=times.__getitem__) if launch.split_k > 1][:6]
    time_launches([dataclasses.replace(launch, last_finishes=True) for launch in split
                   if not launch.last_finishes and dataclasses.replace(launch, last_finishes=True) not in times])
    ranked = sorted(times, key=times.__getitem__)
    floor = n * k * (1 if fp8 else 2) / hbm * 1e3
    print(f"sweep {'fp8' if fp8 else 'bf16':4s} {name:8s} rows {rows}: floor {floor:.4f} ms, current "
          f"{times.get(current, math.nan):.4f} {current}; best "
          + ", ".join(f"{times[b]:.4f} {b}" for b in ranked[:3]), flush=True)
    return ranked[0], times[ranked[0]]


def _sweep(tokens: list[int], hbm: float) -> None:
    """Time every candidate launch per product, weight kind and row count; keep the best in the
    table (`gemv._TUNED`) for the rest of the run and print its entries."""
    best: dict[tuple[str, int, int, int], tuple[GemvLaunch, float]] = {}
    for rows, (name, (k, n)), fp8 in itertools.product(tokens, SHAPES.items(), (False, True)):
        launch, ms = _sweep_product(name, rows, n, k, fp8, hbm)
        key = table_key("fp8" if fp8 else "bf16", rows, n, k)
        if key not in best or ms < best[key][1]:  # two products in one bucket: the faster launch
            best[key] = (launch, ms)
    gemv_module._TUNED.update({key: launch for key, (launch, _) in best.items()})
    print(f"\n# _TUNED entries for engine/kernels/gemv.py ({torch.cuda.get_device_name()}):")
    for key, (launch, _) in sorted(best.items()):
        print(f"    {key!r}: {launch!r},")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="1,4,8,16,128,1024,4096")
    parser.add_argument("--hbm-gbps", type=float, default=3350.0, help="H100 SXM: 3350")
    parser.add_argument("--sweep", action="store_true", help="time the decode GEMV's launch settings first")
    parser.add_argument("--sweep-tokens", default="1,8", help=f"row counts the sweep tunes (<= {MAX_ROWS})")
    parser.add_argument("--sweep-jobs", type=int, default=min(16, os.cpu_count() or 1),
                        help="processes that compile the sweep's kernels first (1: compile while timing)")
    args = parser.parse_args()
    hbm = args.hbm_gbps * 1e9
    if args.sweep:
        sweep_tokens = [int(t) for t in args.sweep_tokens.split(",")]
        if args.sweep_jobs > 1:
            _compile_ahead(sweep_tokens, args.sweep_jobs)
        _sweep(sweep_tokens, hbm)
    print(torch.cuda.get_device_name(), "times in ms")
    header = ["bf16", "fp8", "quant_triton", "quant_torch", "scaled_mm", "gemv_bf16", "gemv_fp8", "floor_bf16",
              "floor_fp8"]
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
