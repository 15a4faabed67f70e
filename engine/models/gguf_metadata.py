"""config.json content read from a GGUF file's own metadata, for the llama.cpp architectures
whose configs transformers' GGUF reader leaves incomplete or cannot read at all.

- `stablelm`: transformers reads the sizes but neither the partial rotation (`StableLmConfig`
  then falls back to a quarter of each head) nor the per-head q/k norms.
- `command-r` (Cohere) and `cohere2`: not read at all.

What the metadata keys do not say is read off the tensors, as llama.cpp itself does: biases
where `attn_q.bias` exists, per-head norms where `attn_q_norm` does, a sequential residual
where a second norm (`ffn_norm`) does, a tied LM head where `output.weight` is missing. llama.cpp
fixes Cohere2's global layers at every fourth unless the file says otherwise
(`attention.sliding_window_pattern`: a period, or one flag per layer, true for a sliding one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def metadata_value(reader: Any, key: str, default: Any = None) -> Any:
    """A GGUF metadata value (a number, a decoded string, or a list for an array), or `default`
    when the file has no such key."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _has_tensor(reader: Any, part: str) -> bool:
    return any(t.name.startswith("blk.") and t.name.split(".", 2)[2].startswith(part) for t in reader.tensors)


def _common(reader: Any, arch: str) -> dict[str, Any]:
    """The sizes every one of these architectures states, in transformers' names."""
    heads = int(metadata_value(reader, f"{arch}.attention.head_count"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = metadata_value(reader, f"{arch}.vocab_size") or (len(tokens.data) if tokens is not None else None)
    if vocab is None:  # the embedding's rows: ggml lists the fastest dim first
        vocab = next(int(t.shape[-1]) for t in reader.tensors if t.name == "token_embd.weight")
    config: dict[str, Any] = {
        "max_position_embeddings": int(metadata_value(reader, f"{arch}.context_length")),
        "num_hidden_layers": int(metadata_value(reader, f"{arch}.block_count")),
        "hidden_size": int(metadata_value(reader, f"{arch}.embedding_length")),
        "intermediate_size": int(metadata_value(reader, f"{arch}.feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(metadata_value(reader, f"{arch}.attention.head_count_kv", heads)),
        "layer_norm_eps": float(metadata_value(reader, f"{arch}.attention.layer_norm_epsilon", 1e-5)),
        "rope_theta": float(metadata_value(reader, f"{arch}.rope.freq_base", 10000.0)),
        "vocab_size": int(vocab),
        "tie_word_embeddings": all(t.name != "output.weight" for t in reader.tensors),
    }
    for name in ("bos", "eos", "padding"):
        token_id = metadata_value(reader, f"tokenizer.ggml.{name}_token_id")
        if token_id is not None:
            config[f"{'pad' if name == 'padding' else name}_token_id"] = int(token_id)
    return config


def _stablelm(reader: Any) -> dict[str, Any]:
    config = _common(reader, "stablelm")
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    rotary_dim = int(metadata_value(reader, "stablelm.rope.dimension_count", head_dim))
    config.update(
        model_type="stablelm",
        partial_rotary_factor=rotary_dim / head_dim,
        use_qkv_bias=_has_tensor(reader, "attn_q.bias"),
        qk_layernorm=_has_tensor(reader, "attn_q_norm"),
        use_parallel_residual=not _has_tensor(reader, "ffn_norm"),
    )
    return config


def _command_r(reader: Any) -> dict[str, Any]:
    config = _common(reader, "command-r")
    config.update(
        model_type="cohere",
        logit_scale=float(metadata_value(reader, "command-r.logit_scale", 1.0)),
        use_qk_norm=_has_tensor(reader, "attn_q_norm"),
        attention_bias=_has_tensor(reader, "attn_q.bias"),
    )
    return config


def _cohere2(reader: Any) -> dict[str, Any]:
    config = _common(reader, "cohere2")
    pattern = metadata_value(reader, "cohere2.attention.sliding_window_pattern", 4)
    layers = range(config["num_hidden_layers"])
    sliding = [bool(pattern[i]) for i in layers] if isinstance(pattern, list) else [(i + 1) % pattern != 0 for i in layers]
    config.update(
        model_type="cohere2",
        logit_scale=float(metadata_value(reader, "cohere2.logit_scale", 1.0)),
        sliding_window=int(metadata_value(reader, "cohere2.attention.sliding_window")),
        layer_types=["sliding_attention" if s else "full_attention" for s in sliding],
        attention_bias=_has_tensor(reader, "attn_q.bias"),
    )
    return config


# general.architecture -> config.json content (with `model_type`), from an opened GGUFReader
METADATA_CONFIGS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "stablelm": _stablelm,
    "command-r": _command_r,
    "cohere2": _cohere2,
}
