"""M-RoPE against transformers' Qwen2-VL rotary (three position sections), and [T] positions as
three equal rows."""

from __future__ import annotations

import pytest
import torch

from engine.layers.mrope import get_mrope

HEADS, KV_HEADS, HEAD_DIM, TOKENS = 4, 2, 16, 11


def _config(**rope: object) -> object:
    from transformers import Qwen2VLTextConfig

    params = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], **rope}
    return Qwen2VLTextConfig(hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                             rope_parameters=params)


def test_three_sections_match_transformers() -> None:
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding, apply_rotary_pos_emb

    config = _config()
    generator = torch.Generator().manual_seed(0)
    positions = torch.randint(0, 300, (3, TOKENS), generator=generator)
    q = torch.randn(TOKENS, HEADS * HEAD_DIM, generator=generator)
    k = torch.randn(TOKENS, KV_HEADS * HEAD_DIM, generator=generator)
    cos, sin = Qwen2VLRotaryEmbedding(config)(q, positions[:, None, :])  # [1, T, D]
    heads = lambda t: t.view(1, TOKENS, -1, HEAD_DIM).transpose(1, 2)  # noqa: E731
    q_ref, k_ref = apply_rotary_pos_emb(heads(q), heads(k), cos, sin)
    rope = get_mrope(config, HEAD_DIM)
    q_out, k_out = rope.forward(positions, q.clone(), k.clone())
    assert torch.allclose(q_out, q_ref.transpose(1, 2).reshape(TOKENS, -1), atol=1e-5)
    assert torch.allclose(k_out, k_ref.transpose(1, 2).reshape(TOKENS, -1), atol=1e-5)
    packed_q, packed_k = rope.forward_packed(positions, torch.cat([q, k], dim=-1), HEADS * HEAD_DIM)
    assert torch.equal(packed_q, q_out) and torch.equal(packed_k, k_out)


def test_equal_positions_are_the_plain_rotary() -> None:
    """A text token's three positions are equal: [T] positions give the same rotation."""
    rope = get_mrope(_config(), HEAD_DIM)
    positions = torch.arange(40, 40 + TOKENS)
    q, k = torch.randn(TOKENS, HEADS * HEAD_DIM), torch.randn(TOKENS, KV_HEADS * HEAD_DIM)
    one = rope.forward(positions, q.clone(), k.clone())
    three = rope.forward(positions.expand(3, -1), q.clone(), k.clone())
    assert torch.allclose(one[0], three[0], atol=1e-6) and torch.allclose(one[1], three[1], atol=1e-6)


def test_sections_must_cover_half_the_head() -> None:
    with pytest.raises(ValueError, match="mrope_section"):
        get_mrope(_config(mrope_section=[2, 3, 2]), HEAD_DIM)
