"""Weight-only int8 / int4 projections on CPU against float references."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.layers import ParallelLMHead, ReplicatedLinear, cpu_gemm
from engine.layers.cpu_gemm import QUANTIZED_MAX_ROWS, QuantizedWeight, quantize_int4, quantize_int8
from engine.models.quantize import quantize_model_weights


def _bf16_linear(in_features: int, out_features: int, seed: int = 0) -> ReplicatedLinear:
    torch.manual_seed(seed)
    layer = ReplicatedLinear(in_features, out_features, bias=True, params_dtype=torch.bfloat16)
    layer.weight.data.copy_(torch.randn(out_features, in_features) * 0.1)
    assert layer.bias is not None
    layer.bias.data.copy_(torch.randn(out_features))
    return layer


def test_int8_round_trip_within_half_a_step() -> None:
    w = torch.randn(48, 64) * torch.logspace(-3, 1, 48).unsqueeze(1)  # rows of very different scale
    q, scale, dequantized = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.bfloat16 and scale.shape == (48,)
    torch.testing.assert_close(dequantized, q.float() * scale.float().unsqueeze(1), rtol=0, atol=0)
    # half a step, and a hair more where bf16 rounded the scale down and 127 clamps
    assert torch.all((dequantized - w).abs() <= 0.51 * scale.float().unsqueeze(1))


def test_int4_gets_a_q4_1_grid_back() -> None:
    """Weights dequantized from Q4_1 (d * q + m per block of 32, q = 0 and 15 in every block)
    quantize to the same q, with scale and zero as close as bf16 allows."""
    gen = torch.Generator().manual_seed(0)
    out_features, in_features = 32, 96
    q = torch.randint(0, 16, (out_features, in_features // 32, 32), generator=gen)
    q[..., 0], q[..., 1] = 0, 15
    d = (torch.rand(out_features, in_features // 32, 1, generator=gen) * 0.01 + 1e-3).half().float()
    m = (-8 * d + torch.randn(d.shape, generator=gen) * 1e-3).half().float()
    w = (d * q + m).view(out_features, in_features)
    q_back, scales_and_zeros, dequantized = quantize_int4(w)
    assert torch.equal(q_back, q.view(out_features, in_features).int())
    assert scales_and_zeros.shape == (in_features // 32, out_features, 2)
    # bf16 scale and zero: a few hundredths of a step (a uniform int4 grid is 1/2 step off at worst)
    assert torch.all((dequantized - w).abs().view_as(q) <= 0.04 * d)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_layer_matches_its_dequantized_weight(method: str) -> None:
    layer = _bf16_linear(64, 48)
    if not cpu_gemm.can_quantize(layer.weight, method):
        pytest.skip("this torch build has no oneDNN packing for bf16")
    original = layer.weight.detach().float().clone()
    assert quantize_model_weights(layer, method) == 1
    packed = layer.packed_weight
    assert isinstance(packed, QuantizedWeight) and packed.method == method
    # the weight itself now holds the dequantized values: Gaussian weights lose ~0.3 % (int8,
    # 127 steps per row) and ~8 % (int4, 15 steps per group of 32)
    assert (layer.weight.float() - original).norm() / original.norm() < (1e-2 if method == "int8" else 0.1)
    assert layer.bias is not None
    x = torch.randn(2 * QUANTIZED_MAX_ROWS + 3, 128).bfloat16()[:, ::2]  # strided rows, as views arrive
    expected = x.float() @ layer.weight.float().T + layer.bias.float()
    # the int8 / int4 kernels up to QUANTIZED_MAX_ROWS rows, the dense copy beyond
    for rows in (1, QUANTIZED_MAX_ROWS, QUANTIZED_MAX_ROWS + 1, x.shape[0]):
        got = layer(x[:rows])
        assert got.dtype == torch.bfloat16 and got.shape == (rows, 48)
        torch.testing.assert_close(got.float(), expected[:rows], rtol=2e-2, atol=2e-2)


def test_quantize_model_weights_keeps_the_lm_head_and_shapes_the_kernels_refuse() -> None:
    model = nn.ModuleDict(
        {
            "proj": _bf16_linear(64, 48),
            "odd": _bf16_linear(64, 40),  # int4 packing needs out % 16 == 0
            "lm_head": ParallelLMHead(256, 64, params_dtype=torch.bfloat16),
        }
    )
    if not cpu_gemm.can_quantize(model["proj"].weight, "int4"):
        pytest.skip("this torch build has no oneDNN packing for bf16")
    model["lm_head"].weight.data.normal_()
    cpu_gemm.pack_model_weights(model)
    assert quantize_model_weights(model, "int4") == 1
    assert isinstance(model["proj"].packed_weight, QuantizedWeight)
    assert isinstance(model["odd"].packed_weight, torch.Tensor)  # still the packed bf16 weight
    assert isinstance(model["lm_head"].packed_weight, torch.Tensor)


def test_quantization_needs_bf16_weights() -> None:
    with pytest.raises(ValueError, match="bfloat16"):
        quantize_model_weights(ReplicatedLinear(64, 48, bias=False), "int8")
    with pytest.raises(ValueError, match="int8"):
        quantize_model_weights(_bf16_linear(64, 48), "fp8")
