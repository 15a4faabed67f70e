"""config.json of the families whose checkpoints ship their own modelling code, read without it.

InternLM2 / 2.5 (`model_type` internlm2), ChatGLM2 / ChatGLM3 / GLM-4 (chatglm) and MiniCPM 1 / 2
(minicpm) name a Python file in `auto_map` that transformers would import and run
(`trust_remote_code`). lightgate never runs it: `read_remote_family_config` reads config.json
itself into a plain `transformers.PretrainedConfig` holding every field of the file, plus the
standard names the engine reads (`num_hidden_layers`, `num_key_value_heads`, `head_dim`,
`intermediate_size`, `max_position_embeddings`, `rms_norm_eps`, `vocab_size`, ...) where the
family calls them something else. Variants whose layers differ from what the family files
build are refused here, with the field that says so.

Rotary scaling: `dynamic` NTK scaling (InternLM2.5, InternLM3) changes the frequencies only
for sequences longer than `max_position_embeddings`, the engine's default context, so within
that context it is the default rotation, and it is read as such.

Tokenizers (`engine.tokenizer.load_tokenizer` passes this config, so transformers never reads
config.json's `auto_map` either): a tokenizer class that exists only as remote code is never
run. Where the directory has a `tokenizer.json`, transformers' generic fast tokenizer loads it
with the special tokens and chat template of tokenizer_config.json. Without one, InternLM2's
and MiniCPM's `tokenizer.model` (a plain SentencePiece model; MiniCPM's class is transformers'
own `LlamaTokenizer`) are converted by transformers, which needs the sentencepiece and protobuf
packages for it (a clear error says so where they are missing); ChatGLM2 / 3 and GLM-4 define their
special tokens (`[gMASK]`, `sop`, the role tokens) in their code, so a ChatGLM directory
without `tokenizer.json` is refused with a message naming `--tokenizer`.
"""

from __future__ import annotations

import json
import os
from typing import Any

REMOTE_CODE_MODEL_TYPES = ("chatglm", "internlm2", "minicpm")
# model types whose `tokenizer.model` transformers' generic tokenizer reads as the remote class does
TOKENIZER_MODEL_CONVERTIBLE = ("internlm2", "minicpm")


def read_config_json(path: str) -> dict[str, Any]:
    with open(os.path.join(path, "config.json")) as f:
        raw: dict[str, Any] = json.load(f)
    return raw


def is_remote_code_family(raw: dict[str, Any]) -> bool:
    return raw.get("model_type") in REMOTE_CODE_MODEL_TYPES


def _rope_parameters(raw: dict[str, Any], theta: float | None = None) -> dict[str, Any]:
    """transformers 5's `rope_parameters` from the older `rope_scaling` + `rope_theta`; a
    `dynamic` scaling reads as the default rotation (see the module docstring)."""
    scaling = dict(raw.get("rope_scaling") or {})
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    if rope_type == "dynamic":
        rope_type, scaling = "default", {}
    return {**scaling, "rope_type": rope_type, "rope_theta": theta or float(raw.get("rope_theta", 10000.0))}


def _internlm2(raw: dict[str, Any]) -> dict[str, Any]:
    bias = bool(raw.get("bias", True))  # the remote code's default: biases on wqkv and wo
    heads = int(raw["num_attention_heads"])
    return {
        "attention_bias": bias,
        "num_key_value_heads": raw.get("num_key_value_heads") or heads,
        "rope_parameters": _rope_parameters(raw),
        "rms_norm_eps": raw.get("rms_norm_eps", 1e-6),
        "tie_word_embeddings": bool(raw.get("tie_word_embeddings", False)),
    }


def _chatglm(raw: dict[str, Any]) -> dict[str, Any]:
    if "padded_vocab_size" not in raw or raw.get("position_encoding_2d"):
        raise ValueError("ChatGLM-6B (the first version, 2D positions) is not supported; ChatGLM2, ChatGLM3 and GLM-4 are")
    for field, needed in (
        ("rmsnorm", True),
        ("add_bias_linear", False),
        ("apply_residual_connection_post_layernorm", False),
        ("post_layer_norm", True),
    ):
        if bool(raw.get(field, needed)) != needed:
            raise ValueError(f"ChatGLM with {field}={raw.get(field)!r} is not supported (only {needed})")
    heads = int(raw["num_attention_heads"])
    head_dim = int(raw.get("kv_channels") or int(raw["hidden_size"]) // heads)
    return {
        "num_hidden_layers": raw["num_layers"],
        "vocab_size": raw["padded_vocab_size"],
        "intermediate_size": raw["ffn_hidden_size"],
        "head_dim": head_dim,
        "num_key_value_heads": raw.get("multi_query_group_num", heads) if raw.get("multi_query_attention") else heads,
        "max_position_embeddings": raw.get("seq_length") or 2048,
        "rms_norm_eps": raw.get("layernorm_epsilon", 1e-5),
        "attention_bias": bool(raw.get("add_qkv_bias", False)),
        # rotary over the first half of each head, base 10 000 x rope_ratio (GLM-4, ChatGLM3-32k)
        "rope_parameters": _rope_parameters(raw, theta=10000.0 * float(raw.get("rope_ratio", 1.0))),
        "partial_rotary_factor": 0.5,
        "tie_word_embeddings": False,  # output_layer is its own tensor
    }


def _minicpm(raw: dict[str, Any]) -> dict[str, Any]:
    heads = int(raw["num_attention_heads"])
    return {
        "num_key_value_heads": raw.get("num_key_value_heads") or heads,
        "rms_norm_eps": raw.get("rms_norm_eps", 1e-6),
        "rope_parameters": _rope_parameters(raw),
        "tie_word_embeddings": bool(raw.get("tie_word_embeddings", True)),  # the remote default
        "scale_emb": float(raw.get("scale_emb", 1.0)),
        "scale_depth": float(raw.get("scale_depth", 1.0)),
        "dim_model_base": float(raw.get("dim_model_base", raw["hidden_size"])),
    }


_STANDARD_NAMES = {"chatglm": _chatglm, "internlm2": _internlm2, "minicpm": _minicpm}


def remote_family_config(raw: dict[str, Any]) -> Any:
    """A `PretrainedConfig` of a remote-code family's config.json content (see the module docstring)."""
    from transformers import PretrainedConfig

    model_type = raw["model_type"]
    fields = {k: v for k, v in raw.items() if k not in ("auto_map", "model_type", "rope_scaling", "rope_theta")}
    fields.update(_STANDARD_NAMES[model_type](raw))
    config = PretrainedConfig(**fields)
    config.model_type = model_type  # type: ignore[misc]  # a class attribute of the base, set per instance
    return config


def read_remote_family_config(path: str) -> Any | None:
    """The config of `path` if it is one of these families, else None (transformers reads it)."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        return None
    raw = read_config_json(path)
    return remote_family_config(raw) if is_remote_code_family(raw) else None
