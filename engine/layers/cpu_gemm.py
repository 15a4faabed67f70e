"""Pre-packed GEMMs on CPU, and opt-in weight-only int8 / int4 projections.

torch's plain `F.linear` on a bf16/fp16 CPU weight re-lays the weight out for the matrix
engine on every call, which costs as much as the product itself at decode sizes. Packing
each weight once, after loading, into oneDNN's blocked layout brings a decode step's
projections down to the cost of reading the weights. float32 weights are packed too:
`F.linear` in float32 goes to MKL's sgemm, slower than oneDNN's packed GEMM at decode and
prefill sizes alike (docs/benchmarks.md, "CPU, offline").

Weight-only quantization (bf16 models; lossy, so opt-in; `engine.models.quantize` applies it
to a loaded model) keeps a projection's weight as int8 with one scale per output row, or as
int4 in groups of 32 inputs with a scale and a zero per group (Q4_1's layout: a Q4_1 GGUF's
weights come back on the same grid). A decode step of a few sequences reads 1/2 or 1/4 of the
bytes through torch's int8 / int4 CPU kernels; their cost grows with the rows much faster than
the packed bf16 GEMM's, and they lose to it beyond `QUANTIZED_MAX_ROWS` rows, so larger
batches and prefill use a packed bf16 copy of the dequantized weight: the same function either
way, up to rounding. `module.weight` is overwritten with the dequantized values too.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Protocol, TypeGuard

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.gguf_linear import GGUFWeight

_PACKABLE = (torch.float32, torch.bfloat16, torch.float16)
# The batch size oneDNN picks its blocking for; decode batches are around this size.
_BATCH_HINT = 16


def can_pack(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dim() == 2 and _packing_works(weight.dtype)


@functools.cache
def _packing_works(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs `dtype` on this CPU (fp16 needs AVX512-FP16 or AVX-NE-CONVERT)."""
    if dtype not in _PACKABLE or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    try:
        pack_weight(torch.zeros(16, 16, dtype=dtype))
    except RuntimeError:
        return False
    return True


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] -> an opaque packed copy for `packed_linear`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _BATCH_HINT)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # x: [num_tokens, in] -> [num_tokens, out]
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [None], "")


QUANTIZATION_METHODS = ("int8", "int4")
INT4_GROUP_SIZE = 32
# Rows up to which the int8 / int4 kernels beat the packed bf16 GEMM on a decode step; from 8
# rows on they tie or lose (docs/benchmarks.md, "CPU, offline", weight-only quantization).
QUANTIZED_MAX_ROWS = 4


@dataclass(frozen=True, slots=True)
class QuantizedWeight:
    """A projection's weight [out, in] quantized for few-row products, with its dense twin."""

    method: str  # "int8" | "int4"
    qweight: torch.Tensor  # int8: [out, in] int8; int4: torch's packed int4 layout (uint8)
    scales: torch.Tensor  # int8: [out] bf16; int4: [in / 32, out, 2] bf16 (scale, zero) per group
    dense: torch.Tensor  # oneDNN-packed bf16 copy of the dequantized weight, for many rows

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # x: [num_tokens, in] bf16 -> [num_tokens, out]
        if x.shape[0] > QUANTIZED_MAX_ROWS:
            return packed_linear(x, self.dense, bias)
        x = x.contiguous()  # the kernels take dense rows
        if self.method == "int8":
            out = torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scales)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.qweight, INT4_GROUP_SIZE, self.scales)
        return out if bias is None else out.add_(bias)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (q int8 [out, in], scale [out] bf16, dequantized float32 [out, in]).

    Symmetric, one scale per output row: scale = absmax / 127, rounded to bf16 before the
    values are divided by it (so q * scale is the dequantized weight exactly).
    """
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).to(torch.bfloat16)
    s = scale.float().unsqueeze(1)
    q = torch.round(w / s).clamp(-127, 127)
    return q.to(torch.int8), scale, q * s


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (q int32 [out, in] in 0..15, scales_and_zeros [in / 32, out, 2] bf16,
    dequantized float32 [out, in]).

    Asymmetric per group of 32 inputs: w ~= (q - 8) * scale + zero (torch's int4 kernel's
    formula) with q = round((w - min) / step), step = (max - min) / 15, as Q4_1 quantizes; so a
    group of Q4_1 values (d * q + m, with q = 0 and q = 15 present, as Q4_1's quantizer makes
    them) gets its own q back. scale = step in bf16, and zero, in bf16 too, is the least-squares
    fit given q and the rounded scale (it absorbs part of the scale's rounding).
    """
    out_features, in_features = weight.shape
    w = weight.float().view(out_features, in_features // INT4_GROUP_SIZE, INT4_GROUP_SIZE)
    low, high = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)  # [out, groups, 1]
    step = ((high - low) / 15.0).clamp(min=1e-12)
    q = torch.round((w - low) / step).clamp(0, 15)
    scale = step.to(torch.bfloat16).float()
    zero = (w - (q - 8.0) * scale).mean(dim=-1, keepdim=True).to(torch.bfloat16).float()
    dequantized = (q - 8.0) * scale + zero
    scales_and_zeros = torch.cat((scale, zero), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return q.view(out_features, in_features).to(torch.int32), scales_and_zeros, dequantized.view_as(weight)


def can_quantize(weight: torch.Tensor, method: str) -> bool:
    """Whether the CPU kernels of `method` take `weight` (bf16 [out, in], shape constraints)."""
    if weight.dtype != torch.bfloat16 or not can_pack(weight):
        return False
    out_features, in_features = weight.shape
    if method == "int4":  # torch's int4 packing: out % 16, in % group size
        return out_features % 16 == 0 and in_features % INT4_GROUP_SIZE == 0
    return True


def quantize_weight(weight: torch.Tensor, method: str) -> tuple[QuantizedWeight, torch.Tensor]:
    """weight [out, in] bf16 -> (its quantized form, the dequantized weight in bf16)."""
    if method == "int8":
        qweight, scales, dequantized = quantize_int8(weight)
    else:
        q, scales, dequantized = quantize_int4(weight)
        qweight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    dequantized = dequantized.to(weight.dtype)
    return QuantizedWeight(method, qweight, scales, pack_weight(dequantized)), dequantized


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    packed: torch.Tensor | QuantizedWeight | GGUFWeight | None,
) -> torch.Tensor:
    if isinstance(packed, GGUFWeight):  # any activation dtype: the kernels compute in float32
        return packed(x, bias)
    if packed is not None and x.dtype == weight.dtype:
        if isinstance(packed, QuantizedWeight):
            return packed(x, bias)
        return packed_linear(x, packed, bias)
    return F.linear(x, weight, bias)


class Projection(Protocol):
    """A module whose product `linear()` computes: the linear layers and the LM head."""

    weight: torch.Tensor  # [out, in]
    packed_weight: torch.Tensor | QuantizedWeight | GGUFWeight | None  # set after loading, on CPU


def _is_projection(module: nn.Module) -> TypeGuard[Projection]:
    return hasattr(module, "packed_weight") and isinstance(module.weight, torch.Tensor)


def projections(model: nn.Module) -> list[Projection]:
    """Modules with a `weight` and a `packed_weight` slot: the linear layers and the LM head."""
    return [m for m in model.modules() if _is_projection(m)]


def pack_model_weights(model: nn.Module) -> int:
    """Pack every packable projection of `model` in place; returns how many were packed.

    A projection is a module with a `weight` and a `packed_weight` slot (the linear layers and
    the LM head); `linear()` uses the packed copy when there is one. A module with a
    `pack_cpu_weights()` method (the MoE experts) packs its own and returns how many.
    """
    count = 0
    for module in projections(model):
        if can_pack(module.weight):
            module.packed_weight = pack_weight(module.weight)
            count += 1
    for owner in model.modules():  # modules holding several matrices (the MoE experts) pack their own
        pack = getattr(owner, "pack_cpu_weights", None)
        if callable(pack):
            count += pack()
    return count
