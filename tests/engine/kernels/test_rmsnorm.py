"""rms_norm against engine.layers.norm.RMSNorm."""

from __future__ import annotations

import pytest
import torch

from engine.kernels.rmsnorm import rms_norm
from engine.layers import RMSNorm


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _reference(hidden: int, dtype: torch.dtype, eps: float, seed: int) -> RMSNorm:
    norm = RMSNorm(hidden, eps=eps, params_dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    norm.weight.data = (1 + 0.5 * torch.randn(hidden, generator=gen)).to(dtype)
    return norm.to(_device())


def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    # Row sums are reduced in another order than torch's, so the float32 rms may differ in
    # its last bits; in 16-bit dtypes that flips the rounding of the normed value now and
    # then (one ulp), and the product with the weight may round the other way too: two ulps.
    tolerances = {
        torch.float32: {"rtol": 1e-5, "atol": 1e-5},
        torch.bfloat16: {"rtol": 2e-2, "atol": 1e-2},
        torch.float16: {"rtol": 2e-3, "atol": 1e-3},
    }
    return tolerances[dtype]


def _check(num_tokens: int, hidden: int, dtype: torch.dtype, with_residual: bool, seed: int = 0) -> None:
    device = _device()
    norm = _reference(hidden, dtype, eps=1e-6, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = (2 * torch.randn(num_tokens, hidden, generator=gen)).to(dtype).to(device)
    residual = torch.randn(num_tokens, hidden, generator=gen).to(dtype).to(device)
    out = torch.full_like(x, float("nan"))  # poisoned: unwritten elements fail
    if with_residual:
        want_y, want_residual = norm(x, residual)
        got_y, got_residual = rms_norm(x, norm.weight, norm.eps, residual=residual, out=out)
        assert got_residual is residual  # updated in place
        # The sum is one rounding of an exact float32 sum: bit for bit.
        torch.testing.assert_close(got_residual, want_residual, rtol=0, atol=0)
    else:
        want_y = norm(x)
        got_y = rms_norm(x, norm.weight, norm.eps, out=out)
    assert got_y is out
    torch.testing.assert_close(got_y, want_y, **_tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize(("num_tokens", "hidden"), [(7, 96), (1, 8)])
def test_rms_norm_matches_torch(
    num_tokens: int, hidden: int, dtype: torch.dtype, with_residual: bool
) -> None:
    _check(num_tokens, hidden, dtype, with_residual)


def test_rms_norm_allocates_and_allows_strided_rows() -> None:
    norm = _reference(40, torch.bfloat16, eps=1e-5, seed=3)
    wide = torch.randn(5, 100, dtype=torch.bfloat16, device=_device())
    x = wide[:, 10:50]  # rows 100 apart
    torch.testing.assert_close(rms_norm(x, norm.weight, norm.eps), norm(x), rtol=2e-2, atol=1e-2)


def test_rms_norm_float32_weight_promotes() -> None:
    # weight float32 * normed bfloat16 -> float32, as the reference's `weight * x.to(dtype)`.
    norm = _reference(24, torch.float32, eps=1e-6, seed=4)
    x = torch.randn(3, 24, dtype=torch.bfloat16, device=_device())
    y = rms_norm(x, norm.weight, norm.eps)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, norm(x), rtol=1e-5, atol=1e-5)


def test_rms_norm_rejects_bad_inputs() -> None:
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(x, torch.ones(9), 1e-6)
    with pytest.raises(ValueError, match="residual must be"):
        rms_norm(x, torch.ones(8), 1e-6, residual=torch.randn(3, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out must be"):
        rms_norm(x, torch.ones(8), 1e-6, out=torch.empty(3, 4))
    with pytest.raises(ValueError, match="x must be"):
        rms_norm(torch.randn(3), torch.ones(3), 1e-6)
    residual = torch.randn(3, 8)
    with pytest.raises(ValueError, match="alias"):
        rms_norm(x, torch.ones(8), 1e-6, residual=residual, out=residual)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize(("num_tokens", "hidden"), [(1, 4096), (8192, 4096), (333, 5120), (17, 2880)])
def test_rms_norm_gpu(num_tokens: int, hidden: int, dtype: torch.dtype, with_residual: bool) -> None:
    _check(num_tokens, hidden, dtype, with_residual, seed=num_tokens)
