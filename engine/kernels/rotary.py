"""Rotary position embedding in place on q and k, neox layout (`rotate_half`), partial rotary.

One program per token looks its cos / sin row up once and rotates every q head and k head.
The first `rotary_dim` dims of a head hold two halves x1 | x2 that become

    x1 * cos - x2 * sin  |  x2 * cos + x1 * sin

and the remaining `head_size - rotary_dim` dims are left as they are. As in
`engine.layers.rotary`, cos and sin are first cast to q's dtype and every product and sum is
rounded to that dtype (one rounding per torch op), so 16-bit results match the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._rounding import round_to

__all__ = ["apply_rotary"]

# Heads rotated per inner-loop step: bounds the registers a program needs at any head count.
_MAX_HEADS_PER_BLOCK = 16


@triton.jit
def _rotate_heads(
    x_ptr,  # row start of one token: [num_heads * head_size]
    num_heads,
    head_size,
    half,
    cos,  # [1, BLOCK_HALF] float32, already rounded to x's dtype
    sin,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    dtype = x_ptr.dtype.element_ty
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    for h0 in range(0, num_heads, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)[:, None]
        mask = (heads < num_heads) & (dims < half)
        ptrs1 = x_ptr + heads * head_size + dims  # [BLOCK_H, BLOCK_HALF]
        ptrs2 = ptrs1 + half
        x1 = tl.load(ptrs1, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(ptrs2, mask=mask, other=0.0).to(tl.float32)
        x1_cos = round_to(x1 * cos, dtype).to(tl.float32)
        x2_sin = round_to(x2 * sin, dtype).to(tl.float32)
        x2_cos = round_to(x2 * cos, dtype).to(tl.float32)
        x1_sin = round_to(x1 * sin, dtype).to(tl.float32)
        tl.store(ptrs1, round_to(x1_cos - x2_sin, dtype), mask=mask)
        tl.store(ptrs2, round_to(x2_cos + x1_sin, dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    positions_ptr,
    cos_ptr,
    sin_ptr,
    stride_q,
    stride_k,
    stride_cos,
    stride_sin,
    num_q_heads,
    num_k_heads,
    head_size,
    half,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    cos = tl.load(cos_ptr + pos * stride_cos + dims, mask=dims < half, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + pos * stride_sin + dims, mask=dims < half, other=0.0).to(tl.float32)
    dtype = q_ptr.dtype.element_ty
    cos = round_to(cos, dtype).to(tl.float32)
    sin = round_to(sin, dtype).to(tl.float32)
    _rotate_heads(q_ptr + token * stride_q, num_q_heads, head_size, half, cos, sin, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr + token * stride_k, num_k_heads, head_size, half, cos, sin, BLOCK_HK, BLOCK_HALF)


def _check_2d(name: str, t: torch.Tensor, num_tokens: int, head_size: int, dtype: torch.dtype) -> int:
    if (
        t.dim() != 2
        or t.shape[0] != num_tokens
        or t.shape[1] % head_size
        or t.stride(-1) != 1
        or t.dtype != dtype
    ):
        raise ValueError(
            f"{name} must be a {dtype} [{num_tokens}, num_heads * {head_size}] tensor with a contiguous "
            f"last dim, got {list(t.shape)} {t.dtype} strides {t.stride()}"
        )
    return t.shape[1] // head_size


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    head_size: int,
    rotary_dim: int,
) -> None:
    """Rotates q [T, Hq * head_size] and k [T, Hk * head_size] in place at `positions` [T].

    cos_cache / sin_cache: [P, rotary_dim // 2] (float32 as `RotaryEmbedding` builds them).
    q and k may be strided row views (e.g. of a packed qkv); every position must be < P,
    which is not checked (it would need a device-to-host sync).
    """
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"q must be float32, bfloat16 or float16, got {q.dtype}")
    if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_size:
        raise ValueError(f"rotary_dim must be even and in (0, head_size={head_size}], got {rotary_dim}")
    if positions.dim() != 1 or positions.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"positions must be [T] int64 or int32, got {list(positions.shape)} {positions.dtype}"
        )
    num_tokens = positions.shape[0]
    num_q_heads = _check_2d("q", q, num_tokens, head_size, q.dtype)
    num_k_heads = _check_2d("k", k, num_tokens, head_size, q.dtype)
    half = rotary_dim // 2
    for name, cache in (("cos_cache", cos_cache), ("sin_cache", sin_cache)):
        if (
            cache.dim() != 2
            or cache.shape[1] != half
            or not cache.is_floating_point()
            or cache.stride(-1) != 1
        ):
            raise ValueError(
                f"{name} must be a float [P, {half}] tensor with a contiguous last dim, "
                f"got {list(cache.shape)} {cache.dtype} strides {cache.stride()}"
            )
    devices = {t.device for t in (q, k, positions, cos_cache, sin_cache)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    if num_tokens == 0:
        return
    block_half = triton.next_power_of_2(half)
    _rotary_kernel[(num_tokens,)](
        q,
        k,
        positions,
        cos_cache,
        sin_cache,
        q.stride(0),
        k.stride(0),
        cos_cache.stride(0),
        sin_cache.stride(0),
        num_q_heads,
        num_k_heads,
        head_size,
        half,
        BLOCK_HQ=min(triton.next_power_of_2(num_q_heads), _MAX_HEADS_PER_BLOCK),
        BLOCK_HK=min(triton.next_power_of_2(num_k_heads), _MAX_HEADS_PER_BLOCK),
        BLOCK_HALF=block_half,
        num_warps=4,
        # No multiply-add contraction: the compiler would otherwise fuse a product into the
        # following sum in float16 arithmetic and skip the rounding torch does in between.
        enable_fp_fusion=False,
    )
