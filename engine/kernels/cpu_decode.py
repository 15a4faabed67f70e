"""A CPU decode step's work between its products, in the C++ library of `gguf_cpu.cpp`.

`rms_norm` (with the residual add fused) and `decode_attention` (one new token per sequence,
its keys and values read in place from the KV pool through `req_to_token`, no gathered copy)
replace several torch ops each, whose dispatch costs more than their arithmetic at decode sizes.
They serve only where the library is already loaded (a model with GGUF blocks loaded it), so
other CPU models keep torch's ops: `loaded()` never builds anything.
"""

from __future__ import annotations

import torch

from engine.kernels import gguf_cpu


def loaded() -> bool:
    """Whether the library is loaded in this process (never builds it)."""
    return gguf_cpu.loaded()


def rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 x [T, C] (+ residual) -> (RMSNorm of the sum times weight [C], the sum)."""
    return torch.ops.lightgate_cpu.rms_norm(x, residual, weight, eps)


def decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    req_to_token: torch.Tensor,
    req_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """q [B, H, D] float32, one token per sequence, against keys [seq_len - window, seq_len) (all
    of them without a window) of row req_indices[b] of req_to_token in the float32 pools
    [slots, KV, D] -> [B, H, D]."""
    return torch.ops.lightgate_cpu.decode_attention(
        q, k_pool, v_pool, req_to_token, req_indices, seq_lens, scale, sliding_window or 0
    )
