"""Offline throughput of the engine on a GPU with a model directory (eager, no server).

    python scripts/gpu_offline.py MODEL_DIR [--backend triton|torch] [--enforce-eager]

bs1: one 512-token prompt, 256 output tokens: TTFT ~ the time of a 1-token request, TPOT from
the rest. batch: N requests with prompts of 128..1024 and outputs of 64..512 random token
ids (eos ignored), all at once: output and total tok/s. Also where the batch run's wall time
went: the server-side host work per step (scheduling, processing results) against the wait
for the worker's results (forward pass, sampling, the pipe). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from engine import LLM, SamplingParams


def _time_core(core) -> dict[str, list]:
    """Wrap the engine core's step phases with wall-clock accumulators: name -> [seconds, calls]."""
    timers: dict[str, list] = {}
    for name, obj in (("schedule", core), ("process", core), ("recv_result", core)):
        fn = getattr(obj, name)
        acc = timers[name] = [0.0, 0]

        def timed(*a, _fn=fn, _acc=acc, **kw):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **kw)
            finally:
                _acc[0] += time.perf_counter() - t0
                _acc[1] += 1

        setattr(obj, name, timed)
    return timers


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--enforce-eager", action="store_true")
    args = parser.parse_args()
    rng = random.Random(0)
    llm = LLM(args.model, attention_backend=args.backend, kv_cache_dtype=args.kv_cache_dtype,
              enable_prefix_caching=False, enforce_eager=args.enforce_eager)
    timers = _time_core(llm.core)
    prompt = [rng.randrange(1000, 40000) for _ in range(512)]
    llm.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up
    start = time.perf_counter()
    llm.generate([prompt], SamplingParams(max_tokens=1, ignore_eos=True))
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    llm.generate([prompt], SamplingParams(max_tokens=257, ignore_eos=True))
    tpot = (time.perf_counter() - start - ttft) / 256
    prompts = [[rng.randrange(1000, 40000) for _ in range(rng.randint(128, 1024))] for _ in range(args.requests)]
    params = [SamplingParams(max_tokens=rng.randint(64, 512), ignore_eos=True) for _ in prompts]
    for t in timers.values():
        t[:] = [0.0, 0]
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - start
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    in_tokens = sum(len(p) for p in prompts)
    print(json.dumps({
        "backend": args.backend, "kv_cache_tokens": llm.kv_cache_tokens, "bs1_ttft_ms": 1e3 * ttft,
        "bs1_tpot_ms": 1e3 * tpot, "batch_requests": len(prompts), "batch_output_tok_s": out_tokens / wall,
        "batch_total_tok_s": (out_tokens + in_tokens) / wall, "enforce_eager": args.enforce_eager,
        "steps": timers["schedule"][1],
        **{f"ms_per_step_{name}": 1e3 * t[0] / max(t[1], 1) for name, t in timers.items()},
    }))
    llm.shutdown()


if __name__ == "__main__":
    main()
