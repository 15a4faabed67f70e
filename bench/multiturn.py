"""`lightgate bench multiturn`: multi-turn chats with a shared system prompt, prefix cache on vs off.

Each conversation sends its whole history every turn (as chat clients do): the system
prompt, then the earlier user and assistant messages, then the new user message. With the
radix prefix cache on, everything but the new message should come from the cache. The two
runs use the same engine settings otherwise and are reported side by side: TTFT p50/p99,
prompt tokens computed (prefill) against prompt tokens sent, and wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from engine import AsyncEngine, EngineConfig, RequestOutputKind, SamplingParams

_SYSTEM = (
    "You are a careful assistant for a lighthouse museum. Answer in plain English, in one or two "
    "sentences, and stay on the topic of lighthouses, ships, coasts and the people who kept the "
    "lights burning. If a question is unclear, ask for the missing detail instead of guessing. "
    "Never invent dates, names or numbers; say that you do not know when you do not know. "
) * 3
_QUESTIONS = [
    "Who kept the lighthouse on the northern cape?",
    "How was the lamp lit before electricity?",
    "Why are some towers painted in stripes?",
    "What did keepers eat during long storms?",
    "How far can the light be seen at night?",
    "What happened when the fog horn broke?",
    "How were supplies brought to the island?",
]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _run(config: EngineConfig, args: argparse.Namespace) -> dict[str, float]:
    engine = AsyncEngine(config)
    await engine.start()
    tokenizer = engine.tokenizer
    ttfts: list[float] = []
    sent = computed = 0
    limit = asyncio.Semaphore(args.concurrency)

    async def conversation(c: int) -> None:
        nonlocal sent, computed
        messages = [{"role": "system", "content": _SYSTEM}]
        for turn in range(args.turns):
            messages.append({"role": "user", "content": f"({c}) " + _QUESTIONS[(c + turn) % len(_QUESTIONS)]})
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens,
                                    output_kind=RequestOutputKind.DELTA)
            text, first = "", None
            async with limit:  # time to first token counts from here, not from queueing for a slot
                start = time.perf_counter()
                async for out in engine.generate(ids, params, f"conv{c}-turn{turn}"):
                    if first is None:
                        first = time.perf_counter() - start
                        sent += len(ids)
                        computed += len(ids) - out.num_cached_tokens
                    text += out.outputs[0].text if out.outputs else ""
            ttfts.append(first or 0.0)
            messages.append({"role": "assistant", "content": text})

    start = time.perf_counter()
    await asyncio.gather(*(conversation(c) for c in range(args.conversations)))
    wall = time.perf_counter() - start
    await engine.shutdown()
    return {
        "ttft_p50_ms": 1e3 * _percentile(ttfts, 0.5),
        "ttft_p99_ms": 1e3 * _percentile(ttfts, 0.99),
        "prompt_tokens_sent": sent,
        "prompt_tokens_computed": computed,
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lightgate bench multiturn", description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--conversations", type=int, default=50)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=8, help="conversations in flight at once")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    results = {}
    for cache in (True, False):
        config = EngineConfig(model=args.model, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype,
                              enable_prefix_caching=cache)
        results["cache on" if cache else "cache off"] = asyncio.run(_run(config, args))
    print(f"\n{args.conversations} conversations x {args.turns} turns, {args.max_tokens} output tokens per turn, "
          f"{args.concurrency} in flight, greedy")
    print(f"{'':12}{'TTFT p50':>11}{'TTFT p99':>11}{'prompt tokens':>15}{'computed':>11}{'wall':>9}")
    for name, r in results.items():
        print(f"{name:12}{r['ttft_p50_ms']:>9.0f}ms{r['ttft_p99_ms']:>9.0f}ms{r['prompt_tokens_sent']:>15.0f}"
              f"{r['prompt_tokens_computed']:>11.0f}{r['wall_s']:>8.1f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
