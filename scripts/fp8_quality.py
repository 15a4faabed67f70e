"""FP8 against 16-bit weights on chat prompts: mean KL of next-token distributions, greedy agreement.

    python scripts/fp8_quality.py [--model DIR|FILE.gguf] [--device cpu|cuda] [--tokens 16]

For each of five chat prompts the 16-bit model (bfloat16) decodes `--tokens` tokens greedily;
then both it and the same checkpoint with `--quantization fp8` score that text, teacher-forced.
Prints, per prompt, the mean KL(16-bit || fp8) over the generated positions and how many of them
pick a different greedy token; then the means. On the CPU the FP8 product is computed in float32
from the quantized operands (`engine.layers.fp8`), as the GPU's FP8 tensor cores compute it.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from engine.models import load_model, resolve_model
from tests.engine.models.harness import Harness

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a CPU does in two sentences.",
    "List three fruits.",
    "How do I reverse a list in Python?",
]


def _prompt_ids(tokenizer: Any, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _harness(model: torch.nn.Module) -> Harness:
    return Harness(model, num_slots=4096, max_rows=1, max_len=1024)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the embedded default model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    reference = load_model(path, torch.bfloat16, args.device)
    fp8 = load_model(path, torch.bfloat16, args.device, quantization="fp8")
    rows = []
    for text in PROMPTS:
        prompt = _prompt_ids(tokenizer, text)
        generated = _harness(reference).generate(prompt, args.tokens)
        scored = slice(len(prompt) - 1, len(prompt) + args.tokens - 1)
        expected = _harness(reference).prefill(0, prompt + generated)[scored].float().log_softmax(-1)
        actual = _harness(fp8).prefill(0, prompt + generated)[scored].float().log_softmax(-1)
        kl = (expected.exp() * (expected - actual)).sum(-1)
        changed = int((expected.argmax(-1) != actual.argmax(-1)).sum())
        rows.append({"prompt": text, "mean_kl": float(kl.mean()), "greedy_changed": changed})
        print(json.dumps(rows[-1]))
    summary = {
        "mean_kl": sum(r["mean_kl"] for r in rows) / len(rows),
        "prompts_with_greedy_unchanged": sum(r["greedy_changed"] == 0 for r in rows),
        "positions_changed": sum(r["greedy_changed"] for r in rows),
        "positions": len(rows) * args.tokens,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
