"""Micro-timings behind choices that comments in the code explain (docs/benchmarks.md,
"Figures behind choices in the code"). CPU, one process, best of a few repeats:

    python scripts/micro_timings.py [--model DIR]   # default: the embedded SmolLM2-135M

- a step plan entry (`SeqStep`) built as a plain slots dataclass, and as a frozen one;
- `PromptBound.min_tokens` counting a 10 MB prompt's dropped characters (a prompt about to be
  refused), against tokenizing 1 MB of the same text;
- the chat template rendering a 10 MB message;
- a 12-token decode through `tokenizer.decode` and through its Rust backend;
- one row's top-p candidates on 16 x 49 152 logits: a whole sort against `topk` 256 and 50.
"""

from __future__ import annotations

import argparse
import timeit
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoTokenizer

from engine.messages import SeqStep
from engine.models.loader import resolve_model
from openai_compat.prompt_size import PromptBound

_TEXT = "The quick brown fox jumps over the lazy dog. "


@dataclass(frozen=True, slots=True)
class FrozenSeqStep:
    """`SeqStep`'s fields, frozen."""

    row: int
    start_pos: int
    token_ids: list[int]
    out_slots: list[int]
    sample: bool
    prefix_slots: list[int] | None = None
    new_row: Any = None
    prompt_logprobs: int | None = None
    seq: Any = None


def best(fn: Callable[[], object], number: int, repeat: int = 5) -> float:
    """Seconds per call: the best of `repeat` runs of `number` calls."""
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number


def plan_entries() -> None:
    args = (3, 600, [-1], [100000], True)
    plain = best(lambda: SeqStep(*args), 200_000)
    frozen = best(lambda: FrozenSeqStep(*args), 200_000)
    print(f"SeqStep: plain {plain * 1e6:.2f} us, frozen {frozen * 1e6:.2f} us ({frozen / plain:.1f}x)")


def prompt_text(tokenizer: Any) -> None:
    bound = PromptBound.of(tokenizer)
    text = (_TEXT * (10_000_000 // len(_TEXT) + 1))[:10_000_000]
    if bound is not None:
        t = best(lambda: bound.min_tokens(text, exact_from=0), 3, 3)
        print(f"PromptBound.min_tokens, 10 MB, dropped characters counted: {t * 1e3:.1f} ms")
    messages = [{"role": "user", "content": text}]
    t = best(lambda: tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), 3, 3)
    print(f"chat template, 10 MB message: {t * 1e3:.1f} ms")
    t = best(lambda: tokenizer(text[:1_000_000])["input_ids"], 1, 2)
    print(f"tokenize 1 MB: {t * 1e3:.0f} ms")


def detokenize(tokenizer: Any) -> None:
    ids = tokenizer(_TEXT * 3)["input_ids"][:12]
    backend = tokenizer.backend_tokenizer
    slow = best(lambda: tokenizer.decode(ids), 20_000)
    fast = best(lambda: backend.decode(ids, skip_special_tokens=False), 20_000)
    print(f"12 ids: tokenizer.decode {slow * 1e6:.1f} us, backend {fast * 1e6:.1f} us ({fast / slow:.2f} of it)")


def nucleus() -> None:
    torch.manual_seed(0)
    logits = torch.randn(16, 49152) * 4
    t_sort = best(lambda: torch.sort(logits, dim=-1, descending=True), 10)
    t_256 = best(lambda: torch.topk(logits, 256, dim=-1), 10)
    t_50 = best(lambda: torch.topk(logits, 50, dim=-1), 10)
    print(f"16 x 49 152 ({torch.get_num_threads()} threads): sort {t_sort * 1e3:.1f} ms, "
          f"topk 256 {t_256 * 1e3:.2f} ms, topk 50 {t_50 * 1e3:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model dir or GGUF file (default: the embedded model)")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))
    plan_entries()
    prompt_text(tokenizer)
    detokenize(tokenizer)
    nucleus()


if __name__ == "__main__":
    main()
