"""The sampler's time per step on the GPU, by sampling settings and batch size.

    python scripts/sampler_bench.py [--rows 1,64,256,1024] [--vocab 128256] [--fused [--ways 4,8,32]]
    python scripts/sampler_bench.py --device cpu --rows 4 --vocab 1000 --iters 2
        (a check of the script itself: times meaningless)

Random float32 logits [rows, vocab] (the 8B-shaped model's vocabulary by default), one
`Sampler.sample_async` per step up to its tokens on the host, every row with the same
settings. Greedy is what the serving benchmarks run; the others are what chat clients send
(a temperature, a nucleus, a top-k, penalties, logprobs). Prints the median milliseconds of
each, and the logits' size read once at the GPU's bandwidth, for scale. The rows run the torch
path; `--fused` adds a row per random setting drawn by the fused Triton kernel
(`engine.worker.sampler.FUSED_RACE`, what the Triton backend uses); `--ways` times the top-k / top-p
rows again with keep_thresholds' search (at every batch size: by default the sampler sorts
below `SEARCH_MIN_ROWS` rows) narrowing by other factors per pass.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import engine.kernels.keep_thresholds as keep_thresholds_module
import engine.worker.sampler as sampler_module
from engine.layers.backend import select_backend
from engine.sampling_params import SamplingParams
from engine.worker.sampler import Sampler
from engine.worker.sampling_state import SamplingState

SETTINGS: dict[str, dict[str, object]] = {
    "greedy": {"temperature": 0.0},
    "temperature 0.7": {"temperature": 0.7},
    "top_p 0.9": {"temperature": 0.7, "top_p": 0.9},
    "top_k 50": {"temperature": 0.7, "top_k": 50},
    "top_k 50, top_p 0.9": {"temperature": 0.7, "top_k": 50, "top_p": 0.9},
    "min_p 0.05": {"temperature": 0.7, "min_p": 0.05},
    "frequency penalty": {"temperature": 0.7, "frequency_penalty": 0.5},
    "seeded": {"temperature": 0.7, "seed": 1},
    "greedy, logprobs 5": {"temperature": 0.0, "logprobs": 5},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,64,256,1024")
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--fused", action="store_true", help="also time the fused Triton draw")
    parser.add_argument("--ways", default=None, metavar="W,W",
                        help="with --fused: also time the top-k / top-p rows with keep_thresholds searching "
                             f"W ways per pass (its default: {keep_thresholds_module._WAYS})")
    args = parser.parse_args()
    device = torch.device(args.device)
    if select_backend(args.device) != "triton" and args.fused:  # the fused draw runs where the Triton backend does
        print("no Triton backend here: the (fused) rows run the torch path")
    rows_list = [int(r) for r in args.rows.split(",")]
    sampler = Sampler(seed=0)
    gen = torch.Generator(device=device).manual_seed(0)
    print(f"{'settings':<34}" + "".join(f"{f'{r} rows ms':>14}" for r in rows_list))
    default_ways = keep_thresholds_module._WAYS
    search_min_rows = sampler_module.SEARCH_MIN_ROWS
    # (label, params, fused, search width, rows from which the search kernel runs)
    runs = [(label, kwargs, False, default_ways, search_min_rows) for label, kwargs in SETTINGS.items()]
    if args.fused:
        runs += [(f"{label} (fused)", kwargs, True, default_ways, search_min_rows)
                 for label, kwargs in SETTINGS.items() if kwargs.get("temperature") != 0.0]
        for ways in [int(w) for w in args.ways.split(",")] if args.ways else []:  # the search at every size
            runs += [(f"{label} (fused, {ways} ways)", kwargs, True, ways, 1) for label, kwargs in SETTINGS.items()
                     if "top_k" in kwargs or "top_p" in kwargs]
    for label, kwargs, fused, ways, min_rows in runs:
        sampler_module.FUSED_RACE = fused
        keep_thresholds_module._WAYS = ways
        sampler_module.SEARCH_MIN_ROWS = min_rows
        params = SamplingParams(**kwargs)  # type: ignore[arg-type]
        cells = []
        for rows in rows_list:
            logits = torch.randn(rows, args.vocab, generator=gen, device=device, dtype=torch.float32) * 4
            prompt = list(range(16))
            states = [SamplingState(params, prompt) for _ in range(rows)]
            times = []
            for i in range(args.iters + 2):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                out = sampler.sample_async(logits, states).result()
                elapsed = time.perf_counter() - start
                for state, token in zip(states, out.token_ids, strict=True):
                    state.append(token)
                if i >= 2:  # the first calls allocate and compile
                    times.append(elapsed)
            cells.append(f"{1e3 * statistics.median(times):>14.3f}")
        print(f"{label:<34}" + "".join(cells))
    if device.type == "cuda":
        gbytes = [r * args.vocab * 4 / 1e9 for r in rows_list]
        print("logits read once at 4.8 TB/s: " + ", ".join(f"{g / 4.8:.3f} ms ({r} rows)" for g, r in zip(gbytes, rows_list, strict=True)))


if __name__ == "__main__":
    main()
