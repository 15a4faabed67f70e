"""Input checks shared by the attention kernels' launchers (no device work, no host syncs)."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_pool(
    name: str, pool: torch.Tensor, scale: torch.Tensor | None, num_kv_heads: int, head_dim: int
) -> None:
    if pool.dim() != 3 or pool.shape[1] != num_kv_heads or pool.shape[2] != head_dim:
        raise ValueError(
            f"{name} must be [num_slots + 1, {num_kv_heads}, {head_dim}], got {tuple(pool.shape)}"
        )
    if pool.dtype == torch.int8:
        if scale is None:
            raise ValueError(f"an int8 {name} needs its per (slot, kv head) scales")
        if tuple(scale.shape) != tuple(pool.shape[:2]) or not scale.is_floating_point():
            raise ValueError(
                f"the scales of {name} must be float [{pool.shape[0]}, {num_kv_heads}], "
                f"got {scale.dtype} {tuple(scale.shape)}"
            )
    elif pool.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or int8, got {pool.dtype}")
    elif scale is not None:
        raise ValueError(f"scales were given for the {pool.dtype} {name}; only int8 pools take scales")


def check_q_and_pools(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    req_to_token: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    q_layout: str,
) -> None:
    """q [rows, num_heads, head_dim] against the K/V pools and req_to_token."""
    if q.dim() != 3:
        raise ValueError(f"q must be [{q_layout}, num_heads, head_dim], got {tuple(q.shape)}")
    _, num_heads, head_dim = q.shape
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
    num_kv_heads = k_pool.shape[1] if k_pool.dim() == 3 else -1
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of the pool's kv heads {num_kv_heads}")
    check_pool("k_pool", k_pool, k_scale, num_kv_heads, head_dim)
    check_pool("v_pool", v_pool, v_scale, num_kv_heads, head_dim)
    if k_pool.dtype != v_pool.dtype or k_pool.shape != v_pool.shape:
        raise ValueError("k_pool and v_pool must have the same shape and dtype")
    if req_to_token.dim() != 2 or req_to_token.dtype != torch.int32:
        raise ValueError(
            f"req_to_token must be a 2-D int32 tensor, got {req_to_token.dtype} {tuple(req_to_token.shape)}"
        )


def check_alibi_slopes(slopes: torch.Tensor | None, num_heads: int, device: torch.device) -> None:
    """ALiBi's slopes, when given: float32 [num_heads] on q's device, one per query head."""
    if slopes is None:
        return
    if slopes.dtype != torch.float32 or tuple(slopes.shape) != (num_heads,) or slopes.stride(0) != 1:
        raise ValueError(
            f"alibi_slopes must be contiguous float32 [{num_heads}], got {slopes.dtype} {tuple(slopes.shape)}"
        )
    if slopes.device != device:
        raise ValueError(f"alibi_slopes must be on q's device {device}, got {slopes.device}")


def dot_precision(dtype: torch.dtype) -> str | None:
    """tl.dot's input precision: exact products for float32 inputs (the precise path, checked
    token for token against the CPU); None (the default) for half-precision inputs."""
    return "ieee" if dtype == torch.float32 else None
