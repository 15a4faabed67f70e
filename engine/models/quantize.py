"""Opt-in quantization of a loaded model: weight-only int8 / int4 on the CPU
(`weight_quantization`), FP8 weights and activations (`quantization`: fp8, see
`engine.layers.fp8`).

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
from engine.layers.fp8 import quantize_fp8_rows
from engine.layers.linear import LinearBase


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


def quantize_model_fp8(model: nn.Module) -> int:
    """Quantize every linear layer of a 16-bit model to FP8 in place (the embedding and the LM
    head keep their weights); returns how many layers were quantized."""
    layers = [m for m in model.modules() if isinstance(m, LinearBase)]
    for module in layers:
        if module.weight.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"fp8 quantization needs a float model, got {module.weight.dtype}")
        quantize_linear_fp8(module)
    return len(layers)


def quantize_linear_fp8(module: LinearBase) -> None:
    """Replace a linear layer's weight [N, K] by its e4m3 values and set `weight_scale` [N, 1];
    the layer's forward then takes `fp8_linear`."""
    q, scale = quantize_fp8_rows(module.weight.data)
    module.weight = nn.Parameter(q, requires_grad=False)
    module.register_buffer("weight_scale", scale, persistent=False)
    module.packed_weight = None  # a CPU packed copy of the old weight no longer applies
