"""The engine loop's own host work per step, with many sequences running: planning a step
(`EngineCore.schedule`) and taking its result in (`EngineCore.process`: tokens, stop checks,
detokenizing), timed per call, without HTTP. The model is a tiny one on the CPU, so the
forward pass costs little; what is timed is the same Python a GPU server runs per step.

    python scripts/host_step_times.py MODEL_DIR [--seqs 512] [--output-len 100] [--profile]

MODEL_DIR: a small model with a tokenizer (e.g. the 2-layer random model of
docs/benchmarks.md, "CPU, served: the server's own work with 256 streams"). Prints the
median time of each at full batch (90 % of --seqs or more) in two rounds: the first fills the
prefix cache (its prompts enter a few per step, so it seldom runs a full batch), the second
finds every prompt cached and runs them all at once. --profile adds a cProfile of the second.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import statistics
import time

from engine.engine_core import EngineCore
from engine.gc_tuning import freeze_startup_objects
from engine.llm import LLM
from engine.sampling_params import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--seqs", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=100)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--sort", default="tottime", help="the profile's order (cProfile's sort keys)")
    parser.add_argument("--top", type=int, default=25, help="the profile's rows")
    args = parser.parse_args()

    rng = random.Random(0)
    prompts = [[rng.randrange(3, 30000) for _ in range(rng.randrange(32, 64))] for _ in range(args.seqs)]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    times: dict[str, list[tuple[float, int]]] = {"schedule": [], "process": []}
    schedule, process = EngineCore.schedule, EngineCore.process

    def timed_schedule(self, *a, **k):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        planned = schedule(self, *a, **k)
        if planned is not None:
            times["schedule"].append((time.perf_counter() - start, len(planned[1].seqs)))
        return planned

    def timed_process(self, sched, plan, *a, **k):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        outputs = process(self, sched, plan, *a, **k)
        times["process"].append((time.perf_counter() - start, len(plan.seqs)))
        return outputs

    EngineCore.schedule, EngineCore.process = timed_schedule, timed_process  # type: ignore[method-assign]
    with LLM(args.model, device="cpu", max_num_seqs=args.seqs, kv_cache_memory_gb=0.5) as llm:
        freeze_startup_objects()  # as the server does
        llm.generate(prompts[:8], SamplingParams(max_tokens=4))
        for round_ in (1, 2):
            for samples in times.values():
                samples.clear()
            profiler = cProfile.Profile() if args.profile and round_ == 2 else None
            if profiler is not None:
                profiler.enable()
            llm.generate(prompts, params)
            if profiler is not None:
                profiler.disable()
            full = {name: [t for t, n in samples if n >= 0.9 * args.seqs] for name, samples in times.items()}
            print(f"round {round_}: " + ", ".join(
                f"{name} {1e3 * statistics.median(ts):.2f} ms ({len(ts)} steps)" if ts else f"{name}: no full step"
                for name, ts in full.items()
            ) + f", median per step at >= {int(0.9 * args.seqs)} sequences")
            if profiler is not None:
                out = io.StringIO()
                pstats.Stats(profiler, stream=out).sort_stats(args.sort).print_stats(args.top)
                print(out.getvalue())


if __name__ == "__main__":
    main()
