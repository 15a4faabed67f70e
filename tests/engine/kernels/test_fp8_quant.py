"""The FP8 activation quantization kernel against `engine.layers.fp8.quantize_fp8_rows`: bit-equal
codes and scales (the GPU path of every FP8 linear layer)."""

from __future__ import annotations

import pytest
import torch

from engine.kernels.fp8_quant import quantize_fp8_rows_triton
from engine.layers.fp8 import quantize_fp8_rows


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _assert_same_codes(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit-equal on the GPU. The CPU interpreter's own float32 -> e4m3 cast rounds some values
    differently (it loses the carry into the next power of two: 31.9 -> 16): under it the scales
    are still checked exactly, the codes for the same sign and within a factor of two, most equal."""
    if got.is_cuda:
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
        return
    g, w = got.float(), want.float()
    assert torch.equal(torch.sign(g), torch.sign(w))
    assert ((g.abs() >= w.abs() / 2) & (g.abs() <= w.abs() * 2)).all()
    assert (g == w).float().mean() > 0.8


@pytest.mark.parametrize(("rows", "cols"), [(1, 64), (5, 1000), (3, 4096), (2, 5000)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_matches_torch_quantization(rows: int, cols: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(rows * cols)
    x = (torch.randn(rows, cols, generator=gen) * torch.logspace(-3, 2, rows).unsqueeze(1)).to(dtype)
    x[0, :7] = torch.tensor([0.0, -0.0, 1e-30, -3e3, 7.5, -1e-4, 448.0])  # zeros, tiny and huge values
    x = x.to(_device())
    want_q, want_scale = quantize_fp8_rows(x)
    got_q, got_scale = quantize_fp8_rows_triton(x)
    assert got_q.dtype == torch.float8_e4m3fn and got_scale.shape == (rows, 1)
    torch.testing.assert_close(got_scale, want_scale, rtol=0, atol=0)
    _assert_same_codes(got_q, want_q)


def test_zero_rows_and_strided_rows() -> None:
    """An all-zero row gets zeros (not NaN); a row slice of a wider tensor reads only its columns."""
    wide = torch.randn(4, 96).to(torch.bfloat16).to(_device())
    wide[2] = 0
    got_q, got_scale = quantize_fp8_rows_triton(wide[:, :64])
    want_q, want_scale = quantize_fp8_rows(wide[:, :64])
    _assert_same_codes(got_q, want_q)
    torch.testing.assert_close(got_scale, want_scale, rtol=0, atol=0)
    assert not got_q.float().isnan().any() and got_q[2].float().abs().sum() == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_real_shapes() -> None:
    """Token counts and widths of an 8B model's layers (4096 hidden, 14336 MLP)."""
    for rows, cols in [(1, 4096), (256, 14336), (8192, 4096)]:
        x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16) * 3
        want_q, want_scale = quantize_fp8_rows(x)
        got_q, got_scale = quantize_fp8_rows_triton(x)
        _assert_same_codes(got_q, want_q)
        torch.testing.assert_close(got_scale, want_scale, rtol=0, atol=0)
