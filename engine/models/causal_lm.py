"""`CausalLM`: what the worker calls on a model, whatever its architecture.

Every class in the registry is one: the model runner and the CUDA graphs run `forward` over a
step's packed tokens and `compute_logits` over the rows they sample.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import nn

from engine.distributed.lazy_weight import WeightLike


class CausalLM(nn.Module, abc.ABC):
    """A decoder-only language model built for one tensor-parallel rank."""

    # Whether the attention of its packed (prefill and mixed) steps takes the Triton kernels on
    # CUDA (with the Triton backend). False: the torch path there, whose per-sequence host loop
    # CUDA graphs cannot capture, so the model runner captures no prefill graphs and runs a
    # mixed step's decodes in the decode graph; its decode steps must still be capturable.
    triton_attention: ClassVar[bool] = True

    @abc.abstractmethod
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T] int64, a step's tokens packed -> hidden [T, hidden_size]."""

    @abc.abstractmethod
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden_size], the rows to sample -> logits [N, vocab] float32 on every rank."""

    def checkpoint_weights(self, weights: Iterable[tuple[str, WeightLike]]) -> Iterable[tuple[str, WeightLike]]:
        """The checkpoint's (name, tensor) pairs as this model's parameters name and lay them
        out. The default passes them through; a family whose checkpoints differ (its own
        weight names, a fused q/k/v in another order, an interleaved rotary layout) maps them
        here, reading a lazy tensor (`read_weight`) only where it must reshape it."""
        return weights
