"""RMSNorm with an optional fused residual add (the torch reference of the Triton kernel)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.backend import use_triton


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, computed in float32 and cast back to the input dtype.

    `forward(x, residual)` first adds the residual stream: x = x + residual, and returns
    `(normed, x)` so that the next layer's residual is the pre-norm sum.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, params_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=params_dtype), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, hidden]
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused op, same math
        # Half precision: transformers' rounding, `weight * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype)`.
        # `rms_norm` without a weight computes in float32 and rounds once, bit for bit that
        # inner term, in one call instead of six.
        return self.weight * F.rms_norm(x, self.weight.shape, None, self.eps)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if use_triton() and x.is_cuda:
            from engine.kernels.rmsnorm import rms_norm

            return rms_norm(x, self.weight, self.eps, residual)  # the residual is updated in place
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class LayerNorm(nn.Module):
    """y = (x - mean(x)) / sqrt(var(x) + eps) * weight (+ bias), computed in float32 and cast
    back to the input dtype, as transformers' families with LayerNorm do (BLOOM, StarCoder,
    StableLM, Cohere, whose LayerNorm has no bias).

    Same calling convention as `RMSNorm`: `forward(x, residual)` adds the residual stream first
    and returns `(normed, x + residual)`.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(hidden_size), requires_grad=False) if bias else None

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, hidden]; normalised in float32 (a 16-bit mean / variance drifts)
        bias = None if self.bias is None else self.bias.float()
        y = F.layer_norm(x.float(), self.weight.shape, self.weight.float(), bias, self.eps)
        return y.to(x.dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, bias={self.bias is not None}"
