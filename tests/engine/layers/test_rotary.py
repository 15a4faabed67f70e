"""Rotary embedding: parameters from old and new configs, inverse frequencies vs transformers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from engine.layers import RotaryEmbedding, get_rope, interleaved_to_half_rows, rope_parameters_from_config
from engine.layers.rotary import compute_inv_freq

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 128,
    "rope_theta": 500000.0,
}


YARN = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 64, "rope_theta": 1e4,
        "beta_fast": 32, "beta_slow": 1}
# DeepSeek's: the attention factor is mscale(factor, mscale) / mscale(factor, mscale_all_dim)
YARN_MSCALE = {**YARN, "mscale": 1.0, "mscale_all_dim": 0.707}


@pytest.mark.parametrize(
    "params", [{"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}, LLAMA3, YARN, YARN_MSCALE]
)
def test_inv_freq_matches_transformers(params: dict[str, object]) -> None:
    config = LlamaConfig(hidden_size=256, num_attention_heads=2, rope_parameters=dict(params),
                         max_position_embeddings=4096)
    expected, expected_factor = ROPE_INIT_FUNCTIONS[str(params["rope_type"])](config, "cpu")
    rope = get_rope(config, 128)
    torch.testing.assert_close(rope.inv_freq, expected.float())
    assert rope.attention_factor == pytest.approx(expected_factor or 1.0, rel=1e-6)
    assert rope.attention_factor != 1.0 or params["rope_type"] != "yarn"


def test_old_style_rope_scaling_is_read() -> None:
    old = SimpleNamespace(
        rope_scaling={"type": "linear", "factor": 3.0}, rope_theta=5e5, max_position_embeddings=64
    )
    params = rope_parameters_from_config(old)
    assert params == {"type": "linear", "factor": 3.0, "rope_theta": 5e5, "rope_type": "linear"}
    plain = SimpleNamespace(rope_scaling=None, rope_theta=None, max_position_embeddings=64)
    assert rope_parameters_from_config(plain) == {"rope_theta": 10000.0, "rope_type": "default"}
    with pytest.raises(ValueError, match="unsupported rope_type 'longrope'"):
        compute_inv_freq(8, {"rope_type": "longrope", "rope_theta": 1e4}, 64)


def test_rotation_preserves_norm_and_is_relative() -> None:
    rope = get_rope(SimpleNamespace(rope_theta=1e4, max_position_embeddings=8), head_size=16)
    assert isinstance(rope, RotaryEmbedding)
    q, k = torch.randn(1, 2 * 16), torch.randn(1, 16)
    dots = []
    for shift in (0, 37):  # beyond the initial cache: it grows
        pos_q, pos_k = torch.tensor([5 + shift]), torch.tensor([2 + shift])
        rq, _ = rope(pos_q, q, k)
        _, rk = rope(pos_k, q, k)
        torch.testing.assert_close(rq.norm(), q.norm())
        dots.append(rq[:, :16] @ rk.T)
    torch.testing.assert_close(dots[0], dots[1], rtol=1e-4, atol=1e-4)


def _rotate_half_reference(
    x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, rotary_dim: int
) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb on x [T, heads, D] (neox layout, partial rotary)."""
    freqs = torch.outer(positions.float(), inv_freq)
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos()[:, None].to(x.dtype), emb.sin()[:, None].to(x.dtype)
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    x1, x2 = rot.chunk(2, dim=-1)
    return torch.cat((rot * cos + torch.cat((-x2, x1), dim=-1) * sin, rest), dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_packed_q_and_k_rotate_like_transformers(partial: float, dtype: torch.dtype) -> None:
    config = SimpleNamespace(rope_theta=1e4, max_position_embeddings=64, partial_rotary_factor=partial)
    rope = get_rope(config, head_size=16)
    positions = torch.tensor([0, 3, 17, 40])
    qkv = torch.randn(4, (3 + 2 * 1) * 16).to(dtype)  # 3 q heads, 1 kv head: [q | k | v]
    qk = qkv[:, : 4 * 16]  # a strided view, as split from the fused projection
    q, k = rope.forward_packed(positions, qk, q_size=3 * 16)
    expected = _rotate_half_reference(qk.reshape(4, 4, 16), positions, rope.inv_freq, rope.rotary_dim)
    # float32: cos / sin tables vs computed on the fly; bf16: the same roundings, bit for bit
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 0.0, "atol": 0.0}
    torch.testing.assert_close(torch.cat((q, k), dim=-1).view(4, 4, 16), expected, **tol)
    q2, k2 = rope(positions, qk[:, : 3 * 16], qk[:, 3 * 16 :])
    assert torch.equal(q, q2) and torch.equal(k, k2)


def _rotate_interleaved_reference(
    x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, rotary_dim: int
) -> torch.Tensor:
    """Cohere's / GLM's rotation of x [T, heads, D]: the pairs (x0, x1), (x2, x3), ... of the
    first rotary_dim dims, each pair by its own frequency."""
    freqs = torch.outer(positions.float(), inv_freq).repeat_interleave(2, dim=-1)  # [T, rotary_dim]
    cos, sin = freqs.cos()[:, None], freqs.sin()[:, None]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    swapped = torch.stack((-rot[..., 1::2], rot[..., ::2]), dim=-1).flatten(-2)
    return torch.cat((rot * cos + swapped * sin, rest), dim=-1)


@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_interleaved_rows_permuted_rotate_like_the_interleaved_layout(partial: float) -> None:
    """q / k projections whose rows `interleaved_to_half_rows` reordered, rotated the
    rotate_half way, give the interleaved rotation of the original rows, reordered the same
    way, so every q . k product (the attention scores) is unchanged."""
    heads, kv_heads, head_dim, hidden = 3, 1, 16, 24
    config = SimpleNamespace(rope_theta=1e4, max_position_embeddings=64, partial_rotary_factor=partial)
    rope = get_rope(config, head_size=head_dim)
    rd = rope.rotary_dim
    w_q, w_k = torch.randn(heads * head_dim, hidden), torch.randn(kv_heads * head_dim, hidden)
    b_q = torch.randn(heads * head_dim)
    x, positions = torch.randn(5, hidden), torch.tensor([0, 1, 7, 30, 63])

    q_ref = _rotate_interleaved_reference((x @ w_q.T + b_q).view(5, heads, head_dim), positions, rope.inv_freq, rd)
    k_ref = _rotate_interleaved_reference((x @ w_k.T).view(5, kv_heads, head_dim), positions, rope.inv_freq, rd)
    w_q2, b_q2 = interleaved_to_half_rows(w_q, heads, rd), interleaved_to_half_rows(b_q, heads, rd)
    w_k2 = interleaved_to_half_rows(w_k, kv_heads, rd)
    q, k = rope(positions, x @ w_q2.T + b_q2, x @ w_k2.T)

    expected_q = interleaved_to_half_rows(q_ref.reshape(5, -1).T, heads, rd).T  # the reordered reference
    torch.testing.assert_close(q, expected_q, rtol=1e-5, atol=1e-5)
    scores = torch.einsum("thd,skd->tsh", q.view(5, heads, head_dim), k.view(5, kv_heads, head_dim))
    scores_ref = torch.einsum("thd,skd->tsh", q_ref, k_ref)
    torch.testing.assert_close(scores, scores_ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(  # rotate_half on the original rows is a different rotation
        rope(positions, x @ w_q.T + b_q, x @ w_k.T)[0], expected_q, rtol=1e-3, atol=1e-3
    )
