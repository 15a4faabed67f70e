"""apply_rotary against engine.layers.rotary.RotaryEmbedding."""

from __future__ import annotations

import pytest
import torch

from engine.kernels.rotary import apply_rotary
from engine.layers import RotaryEmbedding

_ROPE = {"rope_type": "default", "rope_theta": 10000.0}


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _check(
    num_tokens: int,
    num_q_heads: int,
    num_k_heads: int,
    head_size: int,
    rotary_dim: int,
    dtype: torch.dtype,
    max_position: int = 64,
    seed: int = 0,
) -> None:
    device = _device()
    rope = RotaryEmbedding(head_size, rotary_dim, max_position, _ROPE)
    gen = torch.Generator().manual_seed(seed)
    q_width, k_width = num_q_heads * head_size, num_k_heads * head_size
    # q and k are row views of a packed qkv buffer whose v part is poisoned with NaN: a write
    # outside q or k shows up there.
    qkv = torch.randn(num_tokens, q_width + 2 * k_width, generator=gen).to(dtype).to(device)
    qkv[:, q_width + k_width :] = float("nan")
    q, k, v = qkv.split([q_width, k_width, k_width], dim=-1)
    positions = torch.randint(0, max_position, (num_tokens,), generator=gen).to(device)
    want_q, want_k = rope(positions, q.clone(), k.clone())
    cos_cache, sin_cache = rope.cos_cache.to(device), rope.sin_cache.to(device)

    apply_rotary(q, k, positions, cos_cache, sin_cache, head_size, rotary_dim)

    # 16-bit dtypes: one rounding per torch op, bit for bit. float32: the GPU may fuse a
    # multiply-add, one ulp.
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 0.0, "atol": 0.0}
    torch.testing.assert_close(q, want_q, **tol)
    torch.testing.assert_close(k, want_k, **tol)
    assert v.isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("num_tokens", "num_q_heads", "num_k_heads", "head_size", "rotary_dim"),
    [
        (7, 4, 2, 16, 16),  # GQA 2
        (5, 3, 3, 24, 12),  # partial rotary, half = 6 (masked)
        (3, 20, 4, 8, 8),  # more q heads than one head block
    ],
)
def test_rotary_matches_torch(
    num_tokens: int, num_q_heads: int, num_k_heads: int, head_size: int, rotary_dim: int, dtype: torch.dtype
) -> None:
    _check(num_tokens, num_q_heads, num_k_heads, head_size, rotary_dim, dtype)


def test_rotary_rejects_bad_inputs() -> None:
    rope = RotaryEmbedding(8, 8, 16, _ROPE)
    q, k, positions = torch.randn(3, 16), torch.randn(3, 8), torch.arange(3)
    cos, sin = rope.cos_cache, rope.sin_cache
    with pytest.raises(ValueError, match="rotary_dim must be"):
        apply_rotary(q, k, positions, cos, sin, 8, 7)
    with pytest.raises(ValueError, match="k must be"):
        apply_rotary(q, torch.randn(3, 6), positions, cos, sin, 8, 8)
    with pytest.raises(ValueError, match="k must be"):
        apply_rotary(q, k.bfloat16(), positions, cos, sin, 8, 8)
    with pytest.raises(ValueError, match="positions must be"):
        apply_rotary(q, k, positions.float(), cos, sin, 8, 8)
    with pytest.raises(ValueError, match="cos_cache must be"):
        apply_rotary(q, k, positions, cos[:, :2], sin, 8, 8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    ("num_tokens", "num_q_heads", "num_k_heads", "head_size", "rotary_dim"),
    [(1, 32, 8, 128, 128), (8192, 32, 8, 128, 128), (555, 32, 32, 64, 64), (100, 64, 8, 128, 64)],
)
def test_rotary_gpu(
    num_tokens: int, num_q_heads: int, num_k_heads: int, head_size: int, rotary_dim: int, dtype: torch.dtype
) -> None:
    _check(
        num_tokens,
        num_q_heads,
        num_k_heads,
        head_size,
        rotary_dim,
        dtype,
        max_position=32768,
        seed=num_tokens,
    )
