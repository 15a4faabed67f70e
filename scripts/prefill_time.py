"""Time one prompt's prefill through the engine: `LLM.generate` of a prompt of token ids with
max_tokens 1, one request at a time; prints the fastest and the median.

    PYTHONPATH=. .venv/bin/python scripts/prefill_time.py [--model FILE.gguf] [--gguf-prefill bfloat16]
                                                         [--tokens 128] [--prompts 8]

Each prompt differs (no prefix-cache hit); the first one is timed too (the worker is started by
then). Default model: the embedded one.
"""

from __future__ import annotations

import argparse
import statistics
import time

from engine.llm import LLM
from engine.sampling_params import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--gguf-prefill", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=8)
    args = parser.parse_args()
    llm = LLM(args.model, gguf_prefill=args.gguf_prefill)
    greedy_one = SamplingParams(max_tokens=1, temperature=0)
    times = []
    for i in range(args.prompts):
        prompt = [100 + (i * 13 + j * 7) % 5000 for j in range(args.tokens)]
        start = time.perf_counter()
        llm.generate(prompt, greedy_one)
        times.append(time.perf_counter() - start)
    print(
        f"{args.model or 'default model'}, gguf_prefill {args.gguf_prefill}: {args.tokens}-token prefill "
        f"min {min(times) * 1e3:.1f} ms, median {statistics.median(times) * 1e3:.1f} ms"
    )
    llm.shutdown()


if __name__ == "__main__":
    main()
