"""Activations: the gated SwiGLU of Llama-style MLPs and the plain ones of GPT-style MLPs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.backend import use_triton


class SiluAndMul(nn.Module):
    """x: [num_tokens, 2 * d] laid out as [gate | up] -> silu(gate) * up: [num_tokens, d]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_triton() and x.is_cuda:
            from engine.kernels.silu_and_mul import silu_and_mul

            return silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class GeluAndMul(nn.Module):
    """x: [num_tokens, 2 * d] laid out as [gate | up] -> gelu(gate) * up (GeGLU)."""

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate=self.approximate) * up


# transformers' `hidden_act` names -> an elementwise activation. The tanh approximations
# (`gelu_new`, `gelu_fast`, `gelu_pytorch_tanh`, BLOOM's own) are one function written several
# ways: F.gelu(approximate="tanh") computes it in one kernel.
_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "bloom_gelu": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # CLIP's vision towers
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


class Activation(nn.Module):
    """An elementwise activation by its `hidden_act` name (for non-gated MLPs)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        if name not in _ACTIVATIONS:
            raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(sorted(_ACTIVATIONS))}")
        self.name = name
        self._fn = _ACTIVATIONS[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x)

    def extra_repr(self) -> str:
        return self.name
