"""RMSNorm (with fused residual), the per-head LayerNorm and SiluAndMul."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.layers import HeadLayerNorm, RMSNorm, SiluAndMul


def test_rms_norm_with_residual() -> None:
    norm = RMSNorm(8, eps=1e-5)
    norm.weight.data = torch.randn(8)
    x, residual = torch.randn(3, 8), torch.randn(3, 8)
    expected = (x + residual) * torch.rsqrt((x + residual).pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    out, new_residual = norm(x, residual)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(new_residual, x + residual)
    torch.testing.assert_close(norm(x + residual), expected)


def test_rms_norm_keeps_input_dtype() -> None:
    norm = RMSNorm(4, params_dtype=torch.bfloat16)
    assert norm(torch.randn(2, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_bf16_rms_norm_rounds_like_transformers() -> None:
    """Bit for bit transformers' LlamaRMSNorm: float32 inside, rounded before the weight."""
    norm = RMSNorm(64, eps=1e-5, params_dtype=torch.bfloat16)
    norm.weight.data = (torch.randn(64) * 0.3 + 1).bfloat16()
    x = (torch.randn(16, 64) * 3).bfloat16()
    x32 = x.float()
    expected = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    assert torch.equal(norm(x), expected)


def test_silu_and_mul() -> None:
    x = torch.randn(5, 6)
    torch.testing.assert_close(SiluAndMul()(x), torch.nn.functional.silu(x[:, :3]) * x[:, 3:])


def test_head_layer_norm_normalises_each_head_with_its_own_weight() -> None:
    heads, head_dim = 4, 8
    weight = torch.randn(heads, head_dim)
    x = torch.randn(3, heads * head_dim)
    norm = HeadLayerNorm(heads, head_dim, eps=1e-5)
    norm.weight_loader(norm.weight, weight)
    per_head = x.view(3, heads, head_dim)
    expected = torch.stack(
        [F.layer_norm(per_head[:, h], (head_dim,), weight[h], None, 1e-5) for h in range(heads)], dim=1
    )
    out = norm(x.reshape(-1, head_dim))
    torch.testing.assert_close(out.view(3, heads, head_dim), expected)
    assert norm(x.bfloat16().reshape(-1, head_dim)).dtype == torch.bfloat16


def test_head_layer_norm_loads_only_its_ranks_heads() -> None:
    weight = torch.randn(4, 8)
    rank1 = HeadLayerNorm(2, 8, eps=1e-5, first_head=2, total_heads=4)  # rank 1 of 2
    rank1.weight_loader(rank1.weight, weight)
    torch.testing.assert_close(rank1.weight.data, weight[2:])
    with pytest.raises(ValueError, match="per-head norm"):
        rank1.weight_loader(rank1.weight, weight[:3])
