"""The worker's host time per constrained step: the previous step's tokens taken, the next masks filled.

    python scripts/grammar_step_bench.py [--rows 1,64,512] [--vocab 128256] [--device cuda] [--apply]
                                         [--threads 8,16] [--steps 64] [--warmup 32] [--tokenizer DIR]
                                         [--schema bench/schemas/catalog.json]

`rows` constrained rows, each a `SamplingState` with the schema's compiled grammar (default: the
serving benchmark's catalog, bench/schemas/catalog.json), step together as a worker's do. Per step,
what the worker's main thread does between a step's forward pass being queued and its sampler's
launches (engine/worker/model_runner.py `PendingStep.finish`, `ModelRunner.launch`):

    take     `state.append(token)` for every row (the previous step's tokens)
    fill     `GrammarMasks.fill(states)`: each row's bitmask on the host (the library's threads),
             then, on CUDA, its copy queued on a side stream (not waited for)

Each row's next token is drawn at random among those its mask allows (a random non-zero word of
its row, a random set bit of it: what a random-weight model's greedy choice under the mask looks
like to the grammar), from a fixed seed: rows wander through the grammar's states (keys, enums,
numbers, string contents) as the served benchmark's do, and every engine version sees the same
tokens. `--warmup` steps first, unmeasured, spread the rows apart. Prints milliseconds per step:
the median and mean of take, fill and their sum (host, wall time); the mean CPU time over the same
span of all the process's threads (which other processes' load inflates less; it includes the
library's threads spinning after their work) and of the calling thread alone: the serial part,
Python under the GIL, which more cores do not shorten; and with `--apply` the median of the sampler's part:
`apply_token_bitmask` on a copy of [rows, vocab] float32 logits, synchronised. `--vocab` is the
logits' width (default: the tokenizer's; 128 256 for the 8B-shaped model, whose tokenizer is
the default model's). `--threads`: the mask threads, a run for each of a list (default: the
machine's cores, as a worker at tensor parallelism 1 has).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.grammar import GrammarCompiler, GrammarTokenizer, apply_token_bitmask
from engine.layers.backend import select_backend
from engine.sampling_params import SamplingParams
from engine.structured_output import StructuredOutput
from engine.worker.grammar_masks import GrammarMasks, StepMask
from engine.worker.sampling_state import SamplingState

CATALOG = Path(__file__).resolve().parent.parent / "bench" / "schemas" / "catalog.json"


@dataclass(slots=True)
class Times:
    take: list[float] = field(default_factory=list)
    fill: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # take + fill, CPU time of all the process's threads
    main_cpu: list[float] = field(default_factory=list)  # take + fill, CPU time of the calling thread alone
    apply: list[float] = field(default_factory=list)


def _ms(values: list[float], q: float | None = None) -> float:
    if q is None:
        return 1e3 * statistics.fmean(values)
    ordered = sorted(values)
    return 1e3 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _draw(bitmask: torch.Tensor, gen: torch.Generator) -> list[int]:
    """An allowed token per row, at random (what a random-weight model's greedy choice under the
    mask looks like to the grammar): a random non-zero word of the row, a random set bit of it."""
    device = bitmask.device
    scores = torch.rand(bitmask.shape, generator=gen).to(device)
    word = scores.masked_fill_(bitmask == 0, -1.0).argmax(dim=1)  # (a row allows a stop id at least)
    bits = (bitmask.gather(1, word.unsqueeze(1)) >> torch.arange(32, device=device, dtype=torch.int32)) & 1
    bit = torch.rand(bits.shape, generator=gen).to(device).masked_fill_(bits == 0, -1.0).argmax(dim=1)
    return (32 * word + bit).tolist()


def _apply_seconds(logits: torch.Tensor, mask: StepMask) -> float:
    """The sampler's part: the mask applied to a copy of [rows, vocab] logits, device time included."""
    copy = logits.clone()
    _sync(logits.device)
    start = time.perf_counter()
    apply_token_bitmask(copy, mask.bitmask, mask.rows)
    _sync(logits.device)
    return time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_rows(masks: GrammarMasks, so: StructuredOutput, vocab: int, rows: int, device: torch.device,
             steps: int, warmup: int, apply: bool) -> Times:
    params = SamplingParams(max_tokens=1 << 20, structured_output=so)
    states = []
    for _ in range(rows):
        state = SamplingState(params, [0])
        state.compiled_grammar = masks.compile(so)
        states.append(state)
    gen = torch.Generator().manual_seed(rows)
    logits = torch.randn(rows, vocab, generator=gen).to(device) if apply else None
    times = Times()
    tokens: list[int] | None = None
    for step in range(warmup + steps):
        _sync(device)
        cpu_start, main_start = time.process_time(), time.thread_time()
        start = time.perf_counter()
        if tokens is not None:
            for state, token in zip(states, tokens, strict=True):
                state.append(token)
        taken = time.perf_counter()
        mask = masks.fill(states)
        filled = time.perf_counter()
        cpu, main_cpu = time.process_time() - cpu_start, time.thread_time() - main_start
        assert mask is not None
        if step >= warmup:
            times.take.append(taken - start)
            times.fill.append(filled - taken)
            times.cpu.append(cpu)
            times.main_cpu.append(main_cpu)
            if logits is not None:
                times.apply.append(_apply_seconds(logits, mask))
        tokens = _draw(mask.bitmask, gen)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,64,512")
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", default=None, help="mask threads, one run per value: 8,16 (default: the cores)")
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--schema", default=str(CATALOG))
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=32)
    parser.add_argument("--apply", action="store_true", help="also time the mask applied to the logits")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    if args.tokenizer is None:
        from engine.models.loader import resolve_model

        args.tokenizer = resolve_model(None)
    device = torch.device(args.device)
    select_backend(args.device)
    if device.type == "cuda":  # (the worker's device has its index: "cuda:0")
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    gt = GrammarTokenizer(tokenizer, vocab_size=args.vocab, eos_token_ids=[tokenizer.eos_token_id])
    thread_counts = [int(n) for n in args.threads.split(",")] if args.threads else [os.cpu_count() or 1]
    masks = GrammarMasks(device)
    masks.start(lambda: GrammarCompiler(gt))
    so = StructuredOutput(json_schema=Path(args.schema).read_text())
    print(f"tokenizer {args.tokenizer}: {len(tokenizer)} tokens, logits {gt.vocab_size} wide; schema {args.schema}; "
          f"device {args.device}; {args.warmup} + {args.steps} steps")
    print("\n| threads | rows | take p50 / mean ms | fill p50 / p90 / mean ms | host (take + fill) p50 / mean ms "
          "| host CPU: all threads / main thread, mean ms | apply p50 ms |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for threads, rows in itertools.product(thread_counts, (int(r) for r in args.rows.split(","))):
        masks.num_threads = threads
        t = run_rows(masks, so, gt.vocab_size, rows, device, args.steps, args.warmup, args.apply)
        host = [a + b for a, b in zip(t.take, t.fill, strict=True)]
        apply = f"{_ms(t.apply, 0.5):.3f}" if t.apply else "-"
        print(f"| {threads} | {rows} | {_ms(t.take, 0.5):.3f} / {_ms(t.take):.3f} | {_ms(t.fill, 0.5):.3f} / {_ms(t.fill, 0.9):.3f} / "
              f"{_ms(t.fill):.3f} | {_ms(host, 0.5):.3f} / {_ms(host):.3f} | {_ms(t.cpu):.3f} / {_ms(t.main_cpu):.3f} | {apply} |", flush=True)


if __name__ == "__main__":
    main()
