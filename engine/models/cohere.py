"""Cohere (`CohereForCausalLM`: Command-R, Aya 23) and Cohere2 (`Cohere2ForCausalLM`: Command
R7B, Aya Expanse): wiring only, over StableLM's layers (`engine/models/stablelm.py`).

Each layer normalises its input once (LayerNorm without bias) and adds attention and MLP of
that one input to the residual stream (the parallel residual); the logits are multiplied by
`logit_scale`; the LM head is the input embedding. Command-R+ style checkpoints add a
LayerNorm per head of q and k (`use_qk_norm`, weights [heads, head_dim]).

Rotary: Cohere rotates the pairs (x0, x1), (x2, x3), ... of each head (the interleaved
layout); the engine's kernels rotate (x_i, x_{i + D/2}). The q and k rows (weights, biases,
per-head norm weights) are reordered at load by `interleaved_to_half_rows`, which leaves every
q . k product unchanged. The reordering stays lazy and head-local: a tensor-parallel rank reads
and reorders only its own heads' rows.

Cohere2: layers alternate sliding-window attention with rotary and global attention with no
position embedding at all (`layer_types`, or older configs' `sliding_window_pattern`: every
pattern-th layer is global).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from engine.distributed.lazy_weight import LazyWeight, WeightLike, read_weight
from engine.layers import interleaved_to_half_rows
from engine.models.stablelm import StableLmForCausalLM


class _HalfRowsSource:
    """A q or k checkpoint tensor (weight [H * D, in] or bias [H * D]) as seen in the
    `rotate_half` layout. Reading rows [start, stop) of whole heads reads those rows of the
    interleaved tensor (only them, when it is lazy) and reorders each head's rows."""

    def __init__(self, weight: WeightLike, head_dim: int) -> None:
        self.weight = weight
        self.head_dim = head_dim

    def __getitem__(self, index: tuple[slice, ...]) -> torch.Tensor:
        region = self.weight
        for dim, part in enumerate(index):
            region = region.narrow(dim, part.start, part.stop - part.start)
        rows = index[0]
        if rows.start % self.head_dim or rows.stop % self.head_dim:
            raise ValueError(f"q/k rows [{rows.start}, {rows.stop}) do not cover whole heads of {self.head_dim}")
        return interleaved_to_half_rows(read_weight(region), (rows.stop - rows.start) // self.head_dim)


def half_rows(weight: WeightLike, head_dim: int) -> LazyWeight:
    """`weight` (q/k rows in the interleaved rotary layout) reordered to the rotate_half one,
    lazily: nothing is read until a weight loader reads its (narrowed) region."""
    dtype_name = weight.dtype_name if isinstance(weight, LazyWeight) else None
    return LazyWeight(_HalfRowsSource(weight, head_dim), weight.shape, dtype_name=dtype_name)


def _layer_types(config: Any) -> list[str]:
    """Cohere2's `sliding_attention` / `full_attention` per layer."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return list(layer_types)
    pattern = int(getattr(config, "sliding_window_pattern", None) or 4)
    return [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(config.num_hidden_layers)
    ]


class CohereForCausalLM(StableLmForCausalLM):
    """Parallel attention + MLP from one bias-free LayerNorm, scaled logits, interleaved rotary."""

    @classmethod
    def qkv_bias(cls, config: Any) -> bool:
        return bool(getattr(config, "attention_bias", False))

    @classmethod
    def o_bias(cls, config: Any) -> bool:
        return bool(getattr(config, "attention_bias", False))

    @classmethod
    def qk_norm(cls, config: Any) -> bool:
        return bool(getattr(config, "use_qk_norm", False))

    @classmethod
    def norm_bias(cls, config: Any) -> bool:
        return False

    @classmethod
    def parallel_residual(cls, config: Any) -> bool:
        return True

    @classmethod
    def logit_scale_of(cls, config: Any) -> float:
        scale = getattr(config, "logit_scale", None)
        return 1.0 if scale is None else float(scale)

    def checkpoint_weights(self, weights: Iterable[tuple[str, WeightLike]]) -> Iterator[tuple[str, WeightLike]]:
        """q/k projections and per-head q/k norm weights reordered to the rotate_half layout."""
        head_dim = self.shape.head_dim
        for name, tensor in weights:
            if ".self_attn.q_proj." in name or ".self_attn.k_proj." in name:
                yield name, half_rows(tensor, head_dim)
            elif ".self_attn.q_norm." in name or ".self_attn.k_norm." in name:
                norm = read_weight(tensor)  # [heads, head_dim]: small, read whole
                yield name, interleaved_to_half_rows(norm.reshape(-1), norm.shape[0]).view(norm.shape)
            else:
                yield name, tensor


class Cohere2ForCausalLM(CohereForCausalLM):
    """Cohere with sliding-window layers (rotary) and global layers (no rotary), no q/k norms."""

    @classmethod
    def qk_norm(cls, config: Any) -> bool:
        return False

    @classmethod
    def sliding_window_of(cls, config: Any, layer_idx: int) -> int | None:
        if _layer_types(config)[layer_idx] == "sliding_attention":
            return getattr(config, "sliding_window", None)
        return None

    @classmethod
    def rotates(cls, config: Any, layer_idx: int) -> bool:
        return _layer_types(config)[layer_idx] == "sliding_attention"
