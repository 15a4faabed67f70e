"""Pre-packed half-precision GEMMs on CPU.

torch's plain `F.linear` on a bf16/fp16 CPU weight re-lays the weight out for the matrix
engine on every call, which costs as much as the product itself at decode sizes. Packing
each weight once, after loading, into oneDNN's blocked layout brings a decode step's
projections down to the cost of reading the weights (measured in docs/benchmarks.md).
float32 weights are left alone: their plain GEMM is already bound by memory bandwidth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_PACKABLE = (torch.bfloat16, torch.float16)
# The batch size oneDNN picks its blocking for; decode batches are around this size.
_BATCH_HINT = 16


def can_pack(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype in _PACKABLE
        and weight.dim() == 2
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] -> an opaque packed copy for `packed_linear`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _BATCH_HINT)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # x: [num_tokens, in] -> [num_tokens, out]
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [None], "")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor | None) -> torch.Tensor:
    if packed is not None and x.dtype == weight.dtype:
        return packed_linear(x, packed, bias)
    return F.linear(x, weight, bias)


def pack_model_weights(model: nn.Module) -> int:
    """Pack every packable projection of `model` in place; returns how many were packed.

    A projection is a module with a `weight` and a `packed_weight` slot (the linear layers and
    the LM head); `linear()` uses the packed copy when there is one.
    """
    count = 0
    for module in model.modules():
        if hasattr(module, "packed_weight") and can_pack(module.weight):
            module.packed_weight = pack_weight(module.weight)
            count += 1
    return count
