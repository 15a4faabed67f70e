"""Which implementation the layers run: plain torch, or Triton kernels on CUDA.

Chosen once, when the model runner starts (`select_backend`), never per call. The torch
path runs everywhere and is the reference every kernel is tested against; the Triton path
needs a CUDA device and triton. `LIGHTGATE_ATTENTION_BACKEND=torch` forces the torch path
(read here, through the engine's configuration, nowhere else).
"""

from __future__ import annotations

import importlib.util
import logging

logger = logging.getLogger(__name__)

_use_triton = False


def select_backend(device: str, requested: str = "auto") -> str:
    """Pick "triton" or "torch" for this process; returns the choice."""
    global _use_triton
    available = device.startswith("cuda") and importlib.util.find_spec("triton") is not None
    if requested == "triton" and not available:
        raise ValueError("the triton backend needs a CUDA device and the triton package")
    _use_triton = available and requested != "torch"
    choice = "triton" if _use_triton else "torch"
    logger.info("layer backend: %s", choice)
    return choice


def use_triton() -> bool:
    return _use_triton
