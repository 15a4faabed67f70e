"""`ModelConfig.from_hf_config`: the sizes a checkpoint leaves implicit, resolved once."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from engine.model_config import ModelConfig
from tests.engine.models.harness import tiny_config

_SIZES = dict(
    num_hidden_layers=2,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    vocab_size=256,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
)


def test_implicit_kv_heads_and_head_dim_fall_back_to_multi_head_sizes() -> None:
    # a config.json without num_key_value_heads or head_dim (multi-head attention)
    shape = ModelConfig.from_hf_config(SimpleNamespace(**_SIZES))
    assert (shape.num_heads, shape.num_kv_heads, shape.head_dim) == (4, 4, 16)
    assert (shape.num_layers, shape.hidden_size, shape.intermediate_size, shape.vocab_size) == (
        2,
        64,
        128,
        256,
    )
    assert shape.max_position_embeddings == 512 and not shape.tie_word_embeddings


def test_explicit_sizes_win() -> None:
    shape = ModelConfig.from_hf_config(tiny_config("qwen3"))  # head_dim 32, not 64 / 4
    assert (shape.num_heads, shape.num_kv_heads, shape.head_dim) == (4, 2, 32)
    assert shape.tie_word_embeddings == bool(tiny_config("qwen3").tie_word_embeddings)


def test_a_multimodal_wrapper_gives_its_text_config() -> None:
    text = tiny_config("llama", vocab_size=300, num_hidden_layers=3)
    wrapper = SimpleNamespace(text_config=text, vocab_size=7, architectures=["SomeVisionWrapper"])
    shape = ModelConfig.from_hf_config(wrapper)
    assert shape == ModelConfig.from_hf_config(text)
    assert (shape.vocab_size, shape.num_layers) == (300, 3)


def test_a_missing_size_is_named() -> None:
    sizes = {k: v for k, v in _SIZES.items() if k != "num_hidden_layers"}
    with pytest.raises(ValueError, match="num_hidden_layers"):
        ModelConfig.from_hf_config(SimpleNamespace(**sizes))
