"""`CausalLM`: what the worker calls on a model, whatever its architecture.

Every class in the registry is one: the model runner and the CUDA graphs run `forward` over a
step's packed tokens and `compute_logits` over the rows they sample.
"""

from __future__ import annotations

import abc

import torch
from torch import nn


class CausalLM(nn.Module, abc.ABC):
    """A decoder-only language model built for one tensor-parallel rank."""

    @abc.abstractmethod
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T] int64, a step's tokens packed -> hidden [T, hidden_size]."""

    @abc.abstractmethod
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden_size], the rows to sample -> logits [N, vocab] float32 on every rank."""
