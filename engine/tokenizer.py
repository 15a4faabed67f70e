"""Tokenizer loading (transformers) and the model's end-of-sequence ids."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from typing import Any

from engine.model_config import text_config
from engine.models.remote_config import TOKENIZER_MODEL_CONVERTIBLE, read_remote_family_config

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

    remote = read_remote_family_config(path) if os.path.isdir(path) else None
    if remote is None:
        return AutoTokenizer.from_pretrained(path)
    remote_class = _remote_tokenizer_class(path)
    if remote_class is None:  # a transformers class (MiniCPM's LlamaTokenizer): never config.json's auto_map
        return AutoTokenizer.from_pretrained(path, config=remote)
    return _load_without_remote_class(path, remote.model_type, remote_class)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def _remote_tokenizer_class(path: str) -> str | None:
    """The tokenizer class tokenizer_config.json maps to code in the directory, or None."""
    config_path = os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(config_path):
        return None
    with open(config_path) as f:
        tokenizer_config = json.load(f)
    auto_map = tokenizer_config.get("auto_map")
    entry = auto_map.get("AutoTokenizer") if isinstance(auto_map, dict) else auto_map
    if not entry:
        return None
    return str(tokenizer_config.get("tokenizer_class") or entry[0])


def _load_without_remote_class(path: str, model_type: str, remote_class: str) -> Any:
    """A remote-code family's tokenizer without its code (see `engine.models.remote_config`):
    `tokenizer.json` through transformers' generic fast tokenizer, or its `tokenizer.model`
    converted by it where that is the same tokenizer; else a ValueError naming `--tokenizer`."""
    from transformers import PreTrainedTokenizerFast

    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return PreTrainedTokenizerFast.from_pretrained(path)
    if model_type in TOKENIZER_MODEL_CONVERTIBLE and os.path.isfile(os.path.join(path, "tokenizer.model")):
        if not (_importable("sentencepiece") and _importable("google.protobuf")):
            raise ValueError(
                f"{path}: converting its tokenizer.model ({remote_class}'s SentencePiece vocabulary) needs the "
                "sentencepiece and protobuf packages; install them, or add the tokenizer as tokenizer.json"
            )
        return PreTrainedTokenizerFast.from_pretrained(path)
    raise ValueError(
        f"{path}: the tokenizer is {remote_class}, defined by code in the model directory, which lightgate "
        "does not run; add the tokenizer as tokenizer.json or pass --tokenizer with a directory that has one"
    )


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
