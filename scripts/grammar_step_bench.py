"""The worker's host time per constrained step: the previous step's tokens taken, the next masks filled.

    python scripts/grammar_step_bench.py [--rows 1,64,512] [--vocab 128256] [--device cuda]
                                         [--threads N] [--steps 64] [--warmup 32] [--tokenizer DIR]
                                         [--schema bench/schemas/catalog.json]

`rows` constrained rows, each a `SamplingState` with the schema's compiled grammar (default: the
serving benchmark's catalog, bench/schemas/catalog.json), step together as a worker's do. Per step,
what the worker's main thread does between a step's forward pass being queued and its sampler's
launches (engine/worker/model_runner.py `PendingStep.finish`, `ModelRunner.launch`):

    take     `state.append(token)` for every row (the previous step's tokens)
    fill     `GrammarMasks.fill(states)`: each row's bitmask on the host (the library's threads),
             then, on CUDA, its copy queued on a side stream (not waited for)

The tokens are drawn as a random-weight model's greedy choice under the mask: fresh random logits
each step, masked (`apply_token_bitmask`, timed apart as "apply", with a device sync), argmax. So
rows wander through the grammar's states (keys, enums, numbers, string contents) as the served
benchmark's do, and every library and engine version sees the same tokens for the same seed.
`--warmup` steps first, unmeasured, spread the rows apart. Prints milliseconds per step: the
median and mean of take, fill and their sum (host, wall time; and the CPU time of all the
process's threads, which other processes' load inflates less), and the median of apply. `--vocab` is the
logits' width (default: the tokenizer's; 128 256 for the 8B-shaped model, whose tokenizer is
the default model's). `--threads`: the mask threads (default: the worker's, cores / 1).
"""

from __future__ import annotations

import argparse
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
    apply: list[float] = field(default_factory=list)


def _ms(values: list[float], q: float | None = None) -> float:
    if q is None:
        return 1e3 * statistics.fmean(values)
    ordered = sorted(values)
    return 1e3 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _draw(mask: StepMask, pool: list[torch.Tensor], gen: torch.Generator) -> list[int]:
    """A random-weight model's greedy tokens under the mask: random logits (one of the pool's,
    its rows rolled by a random shift: cheaper than drawing them afresh), masked, argmax."""
    pick = torch.randint(len(pool) * pool[0].shape[0], (1,), generator=gen).item()
    logits = pool[pick % len(pool)].roll(pick // len(pool), dims=0)
    apply_token_bitmask(logits, mask.bitmask, mask.rows)
    return logits.argmax(dim=-1).tolist()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_rows(masks: GrammarMasks, so: StructuredOutput, vocab: int, rows: int, device: torch.device,
             steps: int, warmup: int) -> Times:
    params = SamplingParams(max_tokens=1 << 20, structured_output=so)
    states = []
    for _ in range(rows):
        state = SamplingState(params, [0])
        state.compiled_grammar = masks.compile(so)
        states.append(state)
    gen = torch.Generator().manual_seed(rows)
    # Only the tokenizer's ids can be allowed: logits that wide pick the same tokens.
    pool = [torch.randn(rows, vocab, generator=gen).to(device) for _ in range(4)]
    times = Times()
    tokens: list[int] | None = None
    for step in range(warmup + steps):
        _sync(device)
        cpu_start = time.process_time()
        start = time.perf_counter()
        if tokens is not None:
            for state, token in zip(states, tokens, strict=True):
                state.append(token)
        taken = time.perf_counter()
        mask = masks.fill(states)
        filled = time.perf_counter()
        cpu = time.process_time() - cpu_start
        assert mask is not None
        tokens = _draw(mask, pool, gen)
        _sync(device)
        applied = time.perf_counter()
        if step >= warmup:
            times.take.append(taken - start)
            times.fill.append(filled - taken)
            times.cpu.append(cpu)
            times.apply.append(applied - filled)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,64,512")
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="mask threads (default: the machine's cores)")
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--schema", default=str(CATALOG))
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=32)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    if args.tokenizer is None:
        from engine.models.loader import resolve_model

        args.tokenizer = resolve_model(None)
    device = torch.device(args.device)
    select_backend(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    gt = GrammarTokenizer(tokenizer, vocab_size=args.vocab, eos_token_ids=[tokenizer.eos_token_id])
    threads = args.threads or os.cpu_count() or 1
    masks = GrammarMasks(device, num_threads=threads)
    masks.start(lambda: GrammarCompiler(gt))
    so = StructuredOutput(json_schema=Path(args.schema).read_text())
    print(f"tokenizer {args.tokenizer}: {len(tokenizer)} tokens, logits {gt.vocab_size} wide; schema {args.schema}; "
          f"device {args.device}; mask threads {threads}; {args.warmup} + {args.steps} steps")
    print("\n| rows | take p50 / mean ms | fill p50 / p90 / mean ms | host (take + fill) p50 / mean ms | host CPU mean ms "
          "| apply p50 ms |\n| ---: | ---: | ---: | ---: | ---: | ---: |")
    for rows in (int(r) for r in args.rows.split(",")):
        t = run_rows(masks, so, len(tokenizer), rows, device, args.steps, args.warmup)
        host = [a + b for a, b in zip(t.take, t.fill, strict=True)]
        print(f"| {rows} | {_ms(t.take, 0.5):.3f} / {_ms(t.take):.3f} | {_ms(t.fill, 0.5):.3f} / {_ms(t.fill, 0.9):.3f} / "
              f"{_ms(t.fill):.3f} | {_ms(host, 0.5):.3f} / {_ms(host):.3f} | {_ms(t.cpu):.3f} | {_ms(t.apply, 0.5):.3f} |", flush=True)


if __name__ == "__main__":
    main()
