"""RMSNorm with an optional fused residual add (the torch reference of the Triton kernel), LayerNorm,
and a LayerNorm per attention head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.distributed import WeightLike, read_weight
from engine.kernels import cpu_decode
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
        # float32 rows on the CPU take the C++ op (engine.kernels.cpu_decode): chosen per model at
        # load (engine.models.cpu_decode_layer.enable_cpu_kernels)
        self.cpu_kernels = False

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
        if self.cpu_kernels and x.dtype == torch.float32 and self.weight.dtype == torch.float32 and x.dim() == 2:
            if not x.is_cuda:  # one C++ op instead of torch's several (a CPU decode step's dispatch)
                normed, x = cpu_decode.rms_norm(x, residual, self.weight, self.eps)
                return normed if residual is None else (normed, x)
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


class HeadLayerNorm(nn.Module):
    """A LayerNorm over each attention head of q or k, with a weight of its own per head and no
    bias (StableLM's `qk_layernorm`, Cohere's `use_qk_norm`), computed in float32.

    weight: [num_heads, head_dim], this rank's heads: rows [first_head, first_head + num_heads)
    of the checkpoint's [total_heads, head_dim], which its weight loader reads alone.
    `forward` takes rows of single heads, x: [T * num_heads, head_dim] (token-major, as
    `[T, num_heads * head_dim].reshape(-1, head_dim)` lays them out), and returns the same shape.
    """

    def __init__(
        self, num_heads: int, head_dim: int, eps: float, first_head: int = 0, total_heads: int | None = None
    ) -> None:
        super().__init__()
        self.eps = eps
        self.first_head = first_head
        self.total_heads = num_heads if total_heads is None else total_heads
        self.weight = nn.Parameter(torch.ones(num_heads, head_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, loaded_weight: WeightLike) -> None:
        num_heads, head_dim = param.shape
        if tuple(loaded_weight.shape) != (self.total_heads, head_dim):
            raise ValueError(
                f"weight shape mismatch: per-head norm needs ({self.total_heads}, {head_dim}), "
                f"checkpoint {tuple(loaded_weight.shape)}"
            )
        param.data.copy_(read_weight(loaded_weight.narrow(0, self.first_head, num_heads)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num_heads, head_dim = self.weight.shape
        heads = x.float().view(-1, num_heads, head_dim)  # [T, heads, head_dim]
        y = F.layer_norm(heads, (head_dim,), None, None, self.eps) * self.weight.float()
        return y.view(x.shape).to(x.dtype)

    def extra_repr(self) -> str:
        num_heads, head_dim = self.weight.shape
        return f"heads={num_heads} of {self.total_heads}, head_dim={head_dim}, eps={self.eps}"
