"""A CPU decode step's work between its products, in the C++ library of `gguf_cpu.cpp`.

`rms_norm` (with the residual add fused) and `decode_attention` (one new token per sequence,
its keys and values read in place from the KV pool through `req_to_token`, no gathered copy)
replace several torch ops each, whose dispatch costs more than their arithmetic at decode sizes;
`decoder_layer` runs a whole Llama-style layer of a decode step in one call. A model takes
them where its loader chose so (`engine.models.cpu_decode_layer.enable_cpu_kernels`, for a
model served with GGUF blocks, which loaded the library); other models keep torch's ops.
"""

from __future__ import annotations

import torch


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


def decoder_layer(
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    input_norm: torch.Tensor,
    post_norm: torch.Tensor,
    weights: list[torch.Tensor],
    qtypes: list[int],
    counts: list[int],
    biases: list[torch.Tensor | None],
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    out_slots: torch.Tensor,
    req_to_token: torch.Tensor,
    req_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    shape: list[int],
    scale: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pre-norm Llama-style decoder layer for B sequences of one new token each, float32:
    hidden [B, C] (+ residual [B, C], None before the first layer) -> (MLP output, residual after
    attention). `weights` / `qtypes`: the row segments of the qkv, o, gate_up and down weights in
    that order (`counts` of each; ggml type 0 a dense float32 [rows, in] weight), `biases` one per
    linear or None; cos / sin [B, rotary_dim] in the rotate_half layout with the sign folded into
    sin; the new k and v go to the pools [slots, KV, D] at `out_slots`, then attention as in
    `decode_attention`. shape: [heads, kv heads, head_dim, window (0: none), max direct rows of
    a block product]."""
    return torch.ops.lightgate_cpu.decoder_layer(
        hidden, residual, input_norm, post_norm, weights, qtypes, counts, biases, cos, sin, k_pool, v_pool,
        out_slots, req_to_token, req_indices, seq_lens, shape, scale, eps,
    )  # fmt: skip
