"""ALiBi (attention with linear biases): BLOOM's position signal, a bias on each head's scores.

Query head h adds slope_h * (key position - query position) to its score against every key:
0 for its own token, more negative the farther back the key, and no position table at all.
transformers' BLOOM adds slope_h * key position instead; a constant per query row does not
change a softmax, so both give the same attention, and the relative form stays small however
long the context. The torch attention path adds the bias to its masks (`alibi_bias`); the
Triton kernels take the slopes and add it to their float32 scores.
"""

from __future__ import annotations

import math

import torch


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The slopes of all `num_heads` query heads, [num_heads] float32, as BLOOM computes them.

    With n the largest power of two <= num_heads and r = 2^(-8 / n), heads 0 .. n-1 take
    r^1 .. r^n. A head count that is not a power of two takes, for the remaining heads, the
    odd powers 1, 3, 5, ... of 2^(-8 / 2n) (the slopes that a model of 2n heads would
    interleave between them). The powers are taken in float32, as the checkpoints were trained.
    """
    if num_heads <= 0:
        raise ValueError(f"ALiBi needs at least one head, got {num_heads}")
    n = 2 ** int(math.floor(math.log2(num_heads)))

    def powers(exponent_step: float, exponents: torch.Tensor) -> torch.Tensor:
        base = torch.tensor(2.0 ** (-exponent_step), dtype=torch.float32, device="cpu")
        return torch.pow(base, exponents)

    slopes = powers(8.0 / n, torch.arange(1, n + 1, dtype=torch.int32, device="cpu"))
    extra = num_heads - n
    if extra:
        odd = torch.arange(1, 2 * extra, 2, dtype=torch.int32, device="cpu")
        slopes = torch.cat([slopes, powers(8.0 / (2 * n), odd)])
    return slopes


def rank_alibi_slopes(num_heads: int, tp_rank: int, tp_size: int) -> torch.Tensor:
    """The slopes of tensor-parallel rank `tp_rank`'s query heads ([num_heads / tp_size]
    float32): the rank owns heads [rank * H / tp, (rank + 1) * H / tp), as the q/k/v
    projection shards them."""
    if num_heads % tp_size:
        raise ValueError(f"{num_heads} heads do not split over {tp_size} ranks")
    local = num_heads // tp_size
    return alibi_slopes(num_heads)[tp_rank * local : (tp_rank + 1) * local].contiguous()


def alibi_bias(
    slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, allowed: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """Additive attention bias: slopes [H] (float32), q_pos [..., n, 1], k_pos [..., 1, L]
    (positions), allowed: bool broadcastable to [..., n, L] or None ->
    [..., H, n, L] in `dtype`: slope_h * (k_pos - q_pos) where allowed, -inf elsewhere.
    The product is formed in float32 and rounded once."""
    rel = (k_pos - q_pos).to(torch.float32).unsqueeze(-3)  # [..., 1, n, L]
    bias = slopes.to(torch.float32).view(-1, 1, 1) * rel  # [..., H, n, L]
    if allowed is not None:
        bias = bias.masked_fill(~allowed.unsqueeze(-3), float("-inf"))
    return bias.to(dtype)
