"""The fused FP8 product for decode batches against the function of `engine.layers.fp8`: the
activations' codes and scales of the quantization kernel (bit-equal to `quantize_fp8_rows` on the
GPU; under the CPU interpreter it shares the interpreter's own e4m3 cast with the fused kernel),
the product of the dequantized operands in float64. Equal up to the float32 accumulation order
and the final rounding."""

from __future__ import annotations

import pytest
import torch

from engine.kernels.fp8_gemv import MAX_ROWS, default_launch, fp8_gemv
from engine.kernels.fp8_quant import quantize_fp8_rows_triton
from engine.layers.fp8 import quantize_fp8_rows


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _reference(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    xq, xs = quantize_fp8_rows_triton(x)
    y = ((xq.double() @ wq.double().t()) * xs.double() * ws.double().t()).to(x.dtype)
    return y if bias is None else y + bias


def _operands(rows: int, n: int, k: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    wq, ws = quantize_fp8_rows(w)
    x = (torch.randn(rows, k, generator=gen) * 4).to(torch.bfloat16)
    bias = torch.randn(n, generator=gen).to(torch.bfloat16)
    device = _device()
    return x.to(device), wq.to(device), ws.to(device), bias.to(device)


@pytest.mark.parametrize(("rows", "n", "k"), [(1, 48, 64), (3, 40, 300), (MAX_ROWS, 64, 96)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_the_reference(rows: int, n: int, k: int, with_bias: bool) -> None:
    x, wq, ws, bias = _operands(rows, n, k, seed=rows + n + k)
    b = bias if with_bias else None
    got = fp8_gemv(x, wq, ws, b)
    assert got.shape == (rows, n) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), _reference(x, wq, ws, b).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rows", [1, 2, 7, MAX_ROWS])
def test_gpu_real_shapes(rows: int) -> None:
    """An 8B model's four products (q/k/v, output, gate/up, down), every launch shape they take."""
    for n, k in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]:
        x, wq, ws, bias = _operands(rows, n, k, seed=n + k)
        assert default_launch(n, k)[0] * 2 <= n
        torch.testing.assert_close(fp8_gemv(x, wq, ws, bias).float(), _reference(x, wq, ws, bias).float(),
                                   rtol=2e-2, atol=2e-2)
