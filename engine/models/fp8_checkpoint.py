"""Checkpoints stored in FP8: their weights read back to the model's dtype at load.

A checkpoint whose `config.json` has a `quantization_config` with `quant_method` `fp8`
(transformers' fine-grained FP8, block scales) or `compressed-tensors` with 8-bit float weights
stores each quantized linear weight as `X.weight` (float8_e4m3fn [N, K]) beside its scale:
`X.weight_scale` (one value, or one per row: [N] / [N, 1]) or `X.weight_scale_inv` (a block
grid [ceil(N / bn), ceil(K / bk)]; despite the name, W = q * scale). A static `input_scale` is
not used: activations are scaled per token as they come.

The loader dequantizes each such weight once its scale has been seen (the two may come in
either order, from different shards) and the model is then quantized to FP8 again with a scale
per row (`engine.models.quantize.quantize_model_fp8`): per-tensor and per-row checkpoints keep
their values; block-scaled ones are re-rounded to the per-row grid.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from engine.distributed.lazy_weight import WeightLike, read_weight

logger = logging.getLogger(__name__)

_SCALE_SUFFIXES = (".weight_scale_inv", ".weight_scale")
_IGNORED_SUFFIXES = (".input_scale", ".k_scale", ".v_scale")


def is_fp8_checkpoint(hf_config: Any) -> bool:
    """Whether the checkpoint's weights are stored in FP8 (see the module docstring)."""
    quant = getattr(hf_config, "quantization_config", None)
    if quant is not None and not isinstance(quant, dict):
        quant = quant.to_dict()
    if not quant:
        return False
    method = quant.get("quant_method")
    if method == "fp8":
        return True
    if method == "compressed-tensors":
        groups = quant.get("config_groups") or {}
        return any(
            (group.get("weights") or {}).get("type") == "float" and (group.get("weights") or {}).get("num_bits") == 8
            for group in groups.values()
        )
    return False


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight [N, K] float8 and its scale (one value, per row, or a block grid) -> [N, K] in `dtype`."""
    rows, cols = weight.shape
    scale = scale.float()
    if scale.numel() == 1:
        full = scale.reshape(1, 1)
    elif scale.numel() == rows:
        full = scale.reshape(rows, 1)
    elif scale.dim() == 2:
        block_rows, block_cols = -(-rows // scale.shape[0]), -(-cols // scale.shape[1])
        full = scale.repeat_interleave(block_rows, 0)[:rows].repeat_interleave(block_cols, 1)[:, :cols]
    else:
        raise ValueError(f"FP8 weight {tuple(weight.shape)} with a scale of shape {tuple(scale.shape)}")
    return (weight.float() * full).to(dtype)


def dequantized_weights(
    weights: Iterable[tuple[str, WeightLike]], dtype: torch.dtype
) -> Iterator[tuple[str, WeightLike]]:
    """The checkpoint's tensors with every FP8 weight dequantized to `dtype` (paired with its scale)."""
    pending_weights: dict[str, torch.Tensor] = {}  # module name -> fp8 weight waiting for its scale
    pending_scales: dict[str, torch.Tensor] = {}  # module name -> scale waiting for its weight
    for name, tensor in weights:
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        scale_suffix = next((s for s in _SCALE_SUFFIXES if name.endswith(s)), None)
        if scale_suffix is not None:
            module = name[: -len(scale_suffix)]
            weight = pending_weights.pop(module, None)
            if weight is None:
                pending_scales[module] = read_weight(tensor)
            else:
                yield f"{module}.weight", dequantize_fp8(weight, read_weight(tensor), dtype)
            continue
        if name.endswith(".weight") and _is_fp8(tensor):
            module = name[: -len(".weight")]
            scale = pending_scales.pop(module, None)
            if scale is None:
                pending_weights[module] = read_weight(tensor)
            else:
                yield name, dequantize_fp8(read_weight(tensor), scale, dtype)
            continue
        yield name, tensor
    if pending_weights:
        raise ValueError(f"FP8 weights without a scale in the checkpoint, e.g. {sorted(pending_weights)[:3]}")
    if pending_scales:
        logger.warning("ignoring %d FP8 scales whose weight is not FP8", len(pending_scales))


def _is_fp8(tensor: WeightLike) -> bool:
    """Known from the file's header, without reading the tensor."""
    if isinstance(tensor, torch.Tensor):
        return tensor.dtype == torch.float8_e4m3fn
    return tensor.dtype_name == "F8_E4M3"
