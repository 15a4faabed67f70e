"""Which implementation the layers run: plain torch, or Triton kernels on CUDA.

Chosen once, when the model runner starts (`select_backend`), never per call. The torch
path runs everywhere and is the reference every kernel is tested against; the Triton path
needs a CUDA device and triton. `LIGHTGATE_ATTENTION_BACKEND=torch` forces the torch path
(read here, through the engine's configuration, nowhere else).

With the Triton backend, `decode_gemv` (a setting, off by default) sends the linear layers'
products of up to `engine.kernels.gemv.MAX_ROWS` token rows (decode steps at small batches) to
that module's CUDA-core kernels instead of cuBLAS (`F.linear`, `torch._scaled_mm`).
"""

from __future__ import annotations

import importlib.util
import logging

logger = logging.getLogger(__name__)

_use_triton = False
_gemv_max_rows = 0  # rows up to which linear layers take the decode GEMV; 0: never


def select_backend(device: str, requested: str = "auto", decode_gemv: bool = False) -> str:
    """Pick "triton" or "torch" for this process, and whether few-row linear products take the
    decode GEMV (only with Triton); returns the choice."""
    global _use_triton, _gemv_max_rows
    available = device.startswith("cuda") and importlib.util.find_spec("triton") is not None
    if requested == "triton" and not available:
        raise ValueError("the triton backend needs a CUDA device and the triton package")
    _use_triton = available and requested != "torch"
    choice = "triton" if _use_triton else "torch"
    _gemv_max_rows = 0
    if _use_triton and decode_gemv:
        from engine.kernels.gemv import MAX_ROWS  # triton is there: _use_triton

        _gemv_max_rows = MAX_ROWS
    logger.info("layer backend: %s%s", choice, ", decode GEMV" if _gemv_max_rows else "")
    return choice


def use_triton() -> bool:
    return _use_triton


def use_decode_gemv(num_rows: int) -> bool:
    """Whether a linear layer's product over `num_rows` token rows takes `engine.kernels.gemv`
    (the caller checks that its tensors are on CUDA in dtypes the kernel takes)."""
    return 0 < num_rows <= _gemv_max_rows
