"""Gated activations."""

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
