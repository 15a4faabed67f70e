"""`lightgate bench offline`: the engine beside transformers' `generate`, in one run.

Both run the same model (the embedded default unless `--model` is given) with greedy
decoding and a fixed number of output tokens (eos ignored), one after the other, on this
machine. Reported: single-stream decode tok/s and aggregate output tok/s at `--batch`
concurrent requests, and the ratios, with each row's precision: the weights as stored and
the dtype the activations and the KV cache use.

`--engines` lists the engine configurations: a dtype (float32, bfloat16, ...) runs the model
in that dtype; int8 / int4 run bfloat16 with weight-only quantized linear layers (lossy,
opt-in: `weight_quantization`).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

_PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle stays upright while moving.",
    "List some tips for keeping houseplants healthy in winter.",
    "Describe the water cycle to a ten-year-old.",
]


def _prompts(tokenizer, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": _PROMPTS[i % len(_PROMPTS)] + f" (variant {i})"}]
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        out.append(list(ids))
    return out


def _bench_engine(llm, prompts: list[list[int]], max_tokens: int) -> float:
    from engine import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed


def _bench_transformers(model, tokenizer, prompts: list[list[int]], max_tokens: int) -> float:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kwargs = dict(do_sample=False, pad_token_id=pad, eos_token_id=None)
    with torch.inference_mode():
        model.generate(
            ids[:1, -8:], attention_mask=mask[:1, -8:], max_new_tokens=4, min_new_tokens=4, **kwargs
        )
        start = time.perf_counter()
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens, **kwargs
        )
        elapsed = time.perf_counter() - start
    return (out.shape[1] - width) * len(prompts) / elapsed


_QUANTIZED = {"int8": "int8 per row", "int4": "int4 per 32"}


def _engine_kwargs(spec: str) -> tuple[dict[str, Any], str, str]:
    """An `--engines` item -> (LLM keyword arguments, weights label, compute dtype label)."""
    if spec in _QUANTIZED:
        return {"dtype": "bfloat16", "weight_quantization": spec}, _QUANTIZED[spec], "bfloat16"
    return {"dtype": spec}, spec, spec


# name -> (weights, compute dtype, single stream tok/s, batch tok/s)
Rows = dict[str, tuple[str, str, float, float]]
_REFERENCE = "transformers generate float32"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightgate bench offline", description=__doc__)
    parser.add_argument(
        "--model", default=None, help="model dir or GGUF file (default: embedded SmolLM2-135M)"
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--engines",
        default="float32,bfloat16,int4",
        help="engine configurations, comma-separated: a dtype, or int8 / int4 (bfloat16 with quantized weights)",
    )
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    return parser


def _run_engines(args: argparse.Namespace, rows: Rows) -> tuple[Any, str | None]:
    """Each `--engines` configuration in turn, into `rows`; returns the (tokenizer, model dir)
    of the last one."""
    from engine import LLM

    model_path = tokenizer = None
    for spec in args.engines.split(","):
        kwargs, weights, compute = _engine_kwargs(spec.strip())
        llm = LLM(args.model, **kwargs)
        tokenizer, model_path = llm.get_tokenizer(), llm.core.model_path
        prompts = _prompts(tokenizer, args.batch)
        rows[f"lightgate {spec.strip()}"] = (
            weights,
            compute,
            _bench_engine(llm, prompts[:1], args.max_tokens),
            _bench_engine(llm, prompts, args.max_tokens),
        )
        llm.shutdown()
    return tokenizer, model_path


def _run_transformers(args: argparse.Namespace, tokenizer: Any, model_path: str, rows: Rows) -> None:
    from transformers import AutoModelForCausalLM

    prompts = _prompts(tokenizer, args.batch)
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    rows[_REFERENCE] = (
        "float32",
        "float32",
        _bench_transformers(hf, tokenizer, prompts[:1], args.max_tokens),
        _bench_transformers(hf, tokenizer, prompts, args.max_tokens),
    )


def _print_table(args: argparse.Namespace, model_path: str | None, rows: Rows) -> None:
    print(
        f"\nmodel: {model_path}\nthreads: {torch.get_num_threads()}, greedy, {args.max_tokens} output tokens "
        "per request (eos ignored); output tok/s; compute = activations and KV cache"
    )
    ref = rows.get(_REFERENCE)
    header = (
        f"{'':32}{'weights':>14}{'compute':>10}{'single stream':>15}{f'batch {args.batch} aggregate':>22}"
    )
    print(header + ("" if ref is None else f"{'vs transformers':>20}"))
    for name, (weights, compute, single, batch) in rows.items():
        line = f"{name:32}{weights:>14}{compute:>10}{single:>15.1f}{batch:>22.1f}"
        if ref is not None:
            line += f"{f'{single / ref[2]:.2f}x / {batch / ref[3]:.2f}x':>20}"
        print(line)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    rows: Rows = {}
    tokenizer, model_path = _run_engines(args, rows)
    if not args.skip_transformers:
        assert model_path is not None  # `--engines` always names at least one configuration
        _run_transformers(args, tokenizer, model_path, rows)
    _print_table(args, model_path, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    name: {"weights": w, "compute": c, "single_tok_s": single, "batch_tok_s": batch}
                    for name, (w, c, single, batch) in rows.items()
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
