"""silu_and_mul against engine.layers.activation.SiluAndMul."""

from __future__ import annotations

import pytest
import torch

from engine.kernels.silu_and_mul import silu_and_mul
from engine.layers import SiluAndMul


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _check(num_tokens: int, d: int, dtype: torch.dtype, seed: int = 0) -> None:
    device = _device()
    gen = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(num_tokens, 2 * d, generator=gen)).to(dtype).to(device)
    out = torch.full((num_tokens, d), float("nan"), dtype=dtype, device=device)  # poisoned
    got = silu_and_mul(x, out=out)
    assert got is out
    # exp may differ from torch's in the last float32 bit, which can flip the 16-bit rounding of
    # silu by one ulp, and the product's rounding by one more: two ulps.
    tol = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (1.6e-2, 1e-5), torch.float16: (2e-3, 1e-5)}[dtype]
    torch.testing.assert_close(got, SiluAndMul()(x), rtol=tol[0], atol=tol[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("num_tokens", "d"), [(7, 48), (2, 1500)])  # 1500: two column blocks, masked
def test_silu_and_mul_matches_torch(num_tokens: int, d: int, dtype: torch.dtype) -> None:
    _check(num_tokens, d, dtype)


def test_silu_and_mul_allocates_and_allows_strided_rows() -> None:
    wide = torch.randn(4, 40, dtype=torch.bfloat16, device=_device())
    x = wide[:, 4:36]  # rows 40 apart, d = 16
    torch.testing.assert_close(silu_and_mul(x), SiluAndMul()(x), rtol=1.6e-2, atol=1e-5)


def test_silu_and_mul_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="x must be"):
        silu_and_mul(torch.randn(3, 5))
    with pytest.raises(ValueError, match="out must be"):
        silu_and_mul(torch.randn(3, 8), out=torch.empty(3, 8))
    with pytest.raises(ValueError, match="out must be"):
        silu_and_mul(torch.randn(3, 8), out=torch.empty(3, 4, dtype=torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("num_tokens", "d"), [(1, 14336), (8192, 14336), (333, 11008), (5, 1000)])
def test_silu_and_mul_gpu(num_tokens: int, d: int, dtype: torch.dtype) -> None:
    _check(num_tokens, d, dtype, seed=num_tokens)
