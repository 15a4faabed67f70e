"""The grammar layer's cost per step: next-token bitmasks filled on the host, applied on the device.

    python scripts/grammar_mask_bench.py [--rows 1,64,512] [--vocab 128256] [--device cuda]
                                         [--threads N] [--tokenizer DIR]

`rows` sequences generate the same JSON document (scripts/grammar_bench.py's nested schema and
document, tokenized by the model's tokenizer: the default model's unless `--tokenizer`), each
at a different point of it, stepping together. Per step: `fill_bitmasks` for every row (the
host's part, which the worker runs while the device computes the step's forward pass), then
the bitmask's copy to the device and `apply_token_bitmask` on [rows, vocab] float32 logits (the
sampler's part). Prints the median and p90 milliseconds of each. `--vocab` is the logits'
width (default: the tokenizer's; 128 256 for the 8B-shaped model, whose tokenizer is the
default model's).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from grammar_bench import DOCUMENT, NESTED_SCHEMA  # beside this script

from engine.grammar import (
    GrammarCompiler,
    GrammarMatcher,
    GrammarTokenizer,
    allocate_token_bitmask,
    apply_token_bitmask,
    fill_bitmasks,
)
from engine.layers.backend import select_backend
from engine.structured_output import StructuredOutput


def _ms(times: list[float], q: float) -> float:
    ordered = sorted(times)
    return 1e3 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench_rows(gt: GrammarTokenizer, compiler: GrammarCompiler, ids: list[int], rows: int, device: torch.device,
               threads: int | None, steps: int) -> dict[str, float]:
    compiled = compiler.compile(StructuredOutput(json_schema=json.dumps(NESTED_SCHEMA)))
    matchers = [GrammarMatcher(compiled, gt) for _ in range(rows)]
    pos = [(i * len(ids)) // rows for i in range(rows)]
    for m, p in zip(matchers, pos, strict=True):
        m.accept_tokens(ids[:p])
    logits = torch.randn(rows, gt.vocab_size, device=device)
    index = torch.arange(rows, device=device)
    fill_times, apply_times = [], []
    for _ in range(steps):
        bitmask = allocate_token_bitmask(rows, gt.vocab_size, pin_memory=device.type == "cuda")
        start = time.perf_counter()
        fill_bitmasks([(m, i) for i, m in enumerate(matchers)], bitmask, num_threads=threads)
        fill_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        apply_token_bitmask(logits, bitmask.to(device, non_blocking=True), index)
        if device.type == "cuda":
            torch.cuda.synchronize()
        apply_times.append(time.perf_counter() - start)
        for i, m in enumerate(matchers):
            if pos[i] == len(ids):
                m.reset()
                pos[i] = 0
            m.accept(ids[pos[i]])
            pos[i] += 1
    return {"fill_p50": _ms(fill_times, 0.5), "fill_p90": _ms(fill_times, 0.9),
            "fill_mean": 1e3 * statistics.fmean(fill_times), "apply_p50": _ms(apply_times, 0.5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,64,512")
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="mask threads (default: the library's)")
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--steps", type=int, default=None, help="default: twice the document's tokens")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    if args.tokenizer is None:
        from engine.models.loader import resolve_model

        args.tokenizer = resolve_model(None)
    select_backend(args.device)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    start = time.perf_counter()
    gt = GrammarTokenizer(tokenizer, vocab_size=args.vocab, eos_token_ids=[tokenizer.eos_token_id])
    print(f"tokenizer {args.tokenizer}: {len(tokenizer)} tokens, logits {gt.vocab_size} wide, set up in "
          f"{time.perf_counter() - start:.2f} s; device {args.device}; mask threads {args.threads or 'default'}")
    compiler = GrammarCompiler(gt)
    ids = list(tokenizer(json.dumps(DOCUMENT), add_special_tokens=False)["input_ids"])
    steps = args.steps or 2 * len(ids)
    print("\n| rows | fill p50 / p90 / mean ms | copy + apply p50 ms |\n| ---: | ---: | ---: |")
    for rows in (int(r) for r in args.rows.split(",")):
        r = bench_rows(gt, compiler, ids, rows, torch.device(args.device), args.threads, steps)
        print(f"| {rows} | {r['fill_p50']:.3f} / {r['fill_p90']:.3f} / {r['fill_mean']:.3f} | {r['apply_p50']:.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
