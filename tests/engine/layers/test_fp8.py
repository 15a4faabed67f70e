"""FP8 linear layers (`--quantization fp8`): the quantizer, the product, a served model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from engine import LLM, SamplingParams
from engine.layers.fp8 import FP8_DTYPE, FP8_MAX, fp8_linear, quantize_fp8_rows
from engine.models import load_model
from engine.models.quantize import quantize_model_fp8
from tests.engine.models.harness import Harness, rel_err, save_tiny_model, tiny_config


def test_rows_are_scaled_to_the_fp8_range_and_rounded_to_its_grid() -> None:
    x = torch.randn(8, 96, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 8).unsqueeze(1)
    x[3] = 0.0  # an all-zero row: zeros, not NaN
    q, scale = quantize_fp8_rows(x)
    assert q.dtype == FP8_DTYPE and scale.shape == (8, 1)
    back = q.float() * scale
    assert torch.equal(back[3], torch.zeros(96))
    rows = [r for r in range(8) if r != 3]
    # each row's largest magnitude lands on e4m3's largest value
    assert torch.allclose(q.float()[rows].abs().amax(dim=1), torch.full((7,), FP8_MAX))
    # 3 mantissa bits: a relative error of at most 2^-4, plus half the smallest subnormal step
    bound = x.abs() * 2**-4 + scale * 2**-10
    assert bool(((back - x).abs() <= bound * 1.0001).all())


def _on_fp8_grid(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A matrix that FP8 row quantization keeps exactly: e4m3 values times a power of two per row,
    each row reaching +-448 times its power of two."""
    generator = torch.Generator().manual_seed(seed)
    values = (torch.randn(rows, cols, generator=generator) * 100).clamp(-FP8_MAX, FP8_MAX)
    values = values.to(FP8_DTYPE).float()
    values[:, 0] = FP8_MAX * torch.where(torch.rand(rows, generator=generator) < 0.5, -1.0, 1.0)
    powers = 2.0 ** torch.randint(-12, -2, (rows, 1), generator=generator).float()
    return values * powers


@pytest.mark.parametrize("bias", [False, True])
def test_a_product_of_values_on_the_fp8_grid_is_exact(bias: bool) -> None:
    """Operands that quantization keeps exactly give x @ W.T (+ b): the scales are applied to the
    right rows and columns, whatever the sizes."""
    x, w = _on_fp8_grid(5, 64, seed=1), _on_fp8_grid(24, 64, seed=2)
    b = torch.randn(24) if bias else None
    wq, w_scale = quantize_fp8_rows(w)
    assert torch.equal(wq.float() * w_scale, w)
    expected = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    actual = fp8_linear(x, wq, w_scale, b)
    assert actual.dtype == torch.float32 and actual.shape == (5, 24)
    assert torch.allclose(actual.double(), expected, rtol=1e-5, atol=1e-6)


def test_an_fp8_model_stays_close_to_its_16_bit_weights(tmp_path: Path) -> None:
    # q/k/v biases, tied embeddings; weights of a trained model's magnitude (the harness's larger
    # default makes logits so peaked that any rounding is amplified)
    save_tiny_model(str(tmp_path), tiny_config("qwen2", initializer_range=0.02))
    exact: Any = load_model(str(tmp_path), torch.float32, "cpu")
    model: Any = load_model(str(tmp_path), torch.float32, "cpu")
    assert quantize_model_fp8(model) == 2 * 4  # qkv, o, gate_up, down per layer
    assert model.model.layers[0].mlp.down_proj.weight.dtype == FP8_DTYPE
    assert model.lm_head.weight.dtype == torch.float32  # the embedding / LM head keep theirs
    prompt = list(range(3, 40))
    expected = Harness(exact).prefill(0, prompt)
    actual = Harness(model).prefill(0, prompt)
    # 3 mantissa bits against float32: a few percent (bf16 with 7 bits: under 1 %)
    assert 0 < rel_err(actual, expected) < 0.06
    assert (actual.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9


def test_fp8_quantization_serves(tmp_path: Path) -> None:
    save_tiny_model(str(tmp_path), tiny_config("llama"))
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    with LLM(str(tmp_path), dtype="float32", quantization="fp8", kv_cache_memory_gb=0.01) as llm:
        outputs = llm.generate([[5, 6, 7, 8], [9, 10]], params)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [8, 8]


def test_fp8_is_not_combined_with_weight_only_quantization() -> None:
    from engine import EngineConfig

    with pytest.raises(ValueError, match="cannot be combined"):
        EngineConfig(quantization="fp8", weight_quantization="int8")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("tokens", [1, 64, 1000])
def test_fp8_tensor_cores_match_the_float32_product(tokens: int) -> None:
    """At an 8B model's MLP shapes, FP8 GEMM with row-wise scales against the same product in
    float32 from the dequantized operands."""
    from engine.layers import fp8

    if not fp8._has_fp8_gemm(torch.cuda.current_device()):
        pytest.skip("no FP8 tensor cores on this GPU")
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, 4096, device="cuda", generator=generator).bfloat16()
    w = (torch.randn(14336, 4096, device="cuda", generator=generator) * 0.02).bfloat16()
    wq, w_scale = quantize_fp8_rows(w)
    fast = fp8_linear(x, wq, w_scale, None)
    xq, x_scale = quantize_fp8_rows(x)
    reference = (xq.float() * x_scale) @ (wq.float() * w_scale).t()
    assert fast.dtype == torch.bfloat16
    assert rel_err(fast, reference) < 1e-2
