"""Tokenizer loading (transformers) and the model's end-of-sequence ids."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from engine.model_config import text_config

logger = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "tokenizer.tiktoken")


def has_tokenizer(path: str) -> bool:
    """False for a directory that ships no tokenizer files (a name on a hub: True)."""
    return not os.path.isdir(path) or any(os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES)


def load_tokenizer(path: str) -> Any | None:
    """A transformers tokenizer for `path`, or None when the directory ships none."""
    if not has_tokenizer(path):
        logger.warning("%s has no tokenizer files: prompts must be token ids and outputs carry no text", path)
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def eos_token_ids(model_path: str, hf_config: Any, tokenizer: Any | None) -> set[int]:
    """Every id that ends generation: config, generation_config.json and the tokenizer's eos."""
    ids: set[int] = set()

    def add(value: Any) -> None:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))

    add(getattr(text_config(hf_config), "eos_token_id", None))
    gen_path = os.path.join(model_path, "generation_config.json")
    if os.path.exists(gen_path):
        with open(gen_path) as f:
            add(json.load(f).get("eos_token_id"))
    if tokenizer is not None:
        add(tokenizer.eos_token_id)
    return ids
