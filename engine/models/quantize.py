"""Opt-in weight-only quantization of a loaded model (`weight_quantization`: int8 or int4).

A pass over the whole model after `load_model`: each linear layer's weight is quantized by
`engine.layers.cpu_gemm` (which holds the per-weight formats and kernels) and replaced by its
dequantized values, so every path computes the same function; the LM head keeps its bf16
weight.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.layers.cpu_gemm import QUANTIZATION_METHODS, can_quantize, projections, quantize_weight
from engine.layers.embedding import VocabParallelEmbedding


def quantize_model_weights(model: nn.Module, method: str) -> int:
    """Quantize the linear layers of a bf16 CPU model (`method`: int8 or int4) in place.

    The LM head (often tied to the embedding) keeps its bf16 weight. Returns how many layers
    were quantized; a layer the kernels cannot take keeps its packed bf16 weight.
    """
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"weight quantization must be one of {QUANTIZATION_METHODS}, got {method!r}")
    layers = [m for m in projections(model) if not isinstance(m, VocabParallelEmbedding)]
    for module in layers:
        if module.weight.device.type != "cpu" or module.weight.dtype != torch.bfloat16:
            raise ValueError(
                f"{method} weight quantization runs on CPU with dtype bfloat16, "
                f"got {module.weight.dtype} on {module.weight.device}"
            )
    count = 0
    for module in layers:
        if not can_quantize(module.weight, method):
            continue
        module.packed_weight, dequantized = quantize_weight(module.weight, method)
        module.weight.data.copy_(dequantized)  # every path computes the same function
        count += 1
    return count
