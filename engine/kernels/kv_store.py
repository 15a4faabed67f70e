"""KV store: writes each new token's K and V into its slot of the token-granular pool.

One program per token handles every KV head of K and V. A float pool receives the values cast
to its dtype. An int8 pool receives them quantized as `engine.layers.attention.quantize_int8`
does, symmetric per (token, kv head):

    scale = bf16(max(absmax / 127, 1e-8))         # rounded to the scale dtype first
    q     = clamp(rint(x / scale), -127, 127)     # rint: round half to even, like torch.round

Both divisions are IEEE round-to-nearest (`div_rn`) and `rint` is exact, so the stored int8
values and scales equal the torch reference bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._rounding import round_to

__all__ = ["store_kv"]

_INT8_MAX = tl.constexpr(127.0)
# Adding then subtracting 1.5 * 2**23 rounds a float32 |y| < 2**22 to an integer, half to
# even (the float32 ulp there is 1); quantized values are within +-128 before the clamp.
_RINT_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def _quantize_store(
    x,  # [BLOCK_KV, BLOCK_D] float32
    mask,
    pool_ptr,
    pool_offs,  # [BLOCK_KV, BLOCK_D] int64
    scale_ptr,
    scale_offs,  # [BLOCK_KV] int64
    head_mask,
):
    absmax = tl.max(tl.where(mask, tl.abs(x), 0.0), axis=1)  # [BLOCK_KV]
    scale = tl.maximum(tl.math.div_rn(absmax, _INT8_MAX), 1e-8)
    scale = round_to(scale, scale_ptr.dtype.element_ty)  # [BLOCK_KV]
    y = tl.math.div_rn(x, scale.to(tl.float32)[:, None])
    y = (y + _RINT_MAGIC) - _RINT_MAGIC
    y = tl.minimum(tl.maximum(y, -_INT8_MAX), _INT8_MAX)
    tl.store(pool_ptr + pool_offs, y.to(tl.int8), mask=mask)
    tl.store(scale_ptr + scale_offs, scale, mask=head_mask)


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_pool_ptr,
    v_pool_ptr,
    k_scale_ptr,
    v_scale_ptr,
    slots_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kps,
    stride_kph,
    stride_vps,
    stride_vph,
    stride_kss,
    stride_vss,
    num_kv_heads,
    head_dim,
    QUANTIZE: tl.constexpr,
    BLOCK_KV: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    heads = tl.arange(0, BLOCK_KV)
    dims = tl.arange(0, BLOCK_D)
    head_mask = heads < num_kv_heads
    mask = head_mask[:, None] & (dims[None, :] < head_dim)

    k_offs = token * stride_kt + heads[:, None] * stride_kh + dims[None, :]
    v_offs = token * stride_vt + heads[:, None] * stride_vh + dims[None, :]
    kp_offs = slot * stride_kps + heads[:, None] * stride_kph + dims[None, :]
    vp_offs = slot * stride_vps + heads[:, None] * stride_vph + dims[None, :]
    k = tl.load(k_ptr + k_offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + v_offs, mask=mask, other=0.0)
    if QUANTIZE:
        _quantize_store(
            k.to(tl.float32), mask, k_pool_ptr, kp_offs, k_scale_ptr, slot * stride_kss + heads, head_mask
        )
        _quantize_store(
            v.to(tl.float32), mask, v_pool_ptr, vp_offs, v_scale_ptr, slot * stride_vss + heads, head_mask
        )
    else:
        k_out = round_to(k.to(tl.float32), k_pool_ptr.dtype.element_ty)
        v_out = round_to(v.to(tl.float32), v_pool_ptr.dtype.element_ty)
        tl.store(k_pool_ptr + kp_offs, k_out, mask=mask)
        tl.store(v_pool_ptr + vp_offs, v_out, mask=mask)


def _check_float_3d(name: str, t: torch.Tensor) -> None:
    if t.dim() != 3 or not t.is_floating_point() or t.stride(-1) != 1:
        raise ValueError(
            f"{name} must be a float [N, num_kv_heads, head_dim] tensor with a contiguous last dim, "
            f"got {tuple(t.shape)} {t.dtype} strides {t.stride()}"
        )


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    slots: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Writes k[t], v[t] ([T, KV, D]) to k_pool[slots[t]], v_pool[slots[t]] ([S + 1, KV, D]).

    Float pools receive the values cast to the pool dtype. int8 pools need `k_scale` and
    `v_scale` ([S + 1, KV], a float dtype) and receive `quantize_int8(k)` / `quantize_int8(v)`.
    `slots` ([T] int64 or int32) must be distinct and inside the pool; this is not checked,
    as it would need a device-to-host sync (duplicate slots leave one unspecified writer).
    """
    _check_float_3d("k", k)
    _check_float_3d("v", v)
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    num_tokens, num_kv_heads, head_dim = k.shape
    if k_pool.dim() != 3 or k_pool.shape[1:] != (num_kv_heads, head_dim) or k_pool.stride(-1) != 1:
        raise ValueError(
            f"k_pool must be [num_slots + 1, {num_kv_heads}, {head_dim}] with a contiguous last dim, "
            f"got {tuple(k_pool.shape)} strides {k_pool.stride()}"
        )
    if v_pool.shape != k_pool.shape or v_pool.dtype != k_pool.dtype or v_pool.stride(-1) != 1:
        raise ValueError(
            f"v_pool must match k_pool ({tuple(k_pool.shape)} {k_pool.dtype}), "
            f"got {tuple(v_pool.shape)} {v_pool.dtype} strides {v_pool.stride()}"
        )
    if slots.shape != (num_tokens,) or slots.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"slots must be [{num_tokens}] int64 or int32, got {tuple(slots.shape)} {slots.dtype}"
        )
    quantize = k_pool.dtype == torch.int8
    if quantize:
        num_slots = k_pool.shape[0]
        for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
            if scale is None:
                raise ValueError(f"an int8 pool needs {name}")
            if (
                scale.shape != (num_slots, num_kv_heads)
                or not scale.is_floating_point()
                or scale.stride(-1) != 1
            ):
                raise ValueError(
                    f"{name} must be a float [{num_slots}, {num_kv_heads}] tensor with a contiguous last dim, "
                    f"got {tuple(scale.shape)} {scale.dtype} strides {scale.stride()}"
                )
    elif not k_pool.is_floating_point():
        raise ValueError(f"pools must be int8 or a float dtype, got {k_pool.dtype}")
    elif k_scale is not None or v_scale is not None:
        raise ValueError(f"scales are only for int8 pools; the pool is {k_pool.dtype}")
    tensors = [k, v, k_pool, v_pool, slots] + ([k_scale, v_scale] if quantize else [])
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    if num_tokens == 0:
        return

    # Float pools pass themselves as placeholder scale pointers; QUANTIZE=False never reads them.
    ks = k_scale if quantize and k_scale is not None else k_pool
    vs = v_scale if quantize and v_scale is not None else v_pool
    block_kv = triton.next_power_of_2(num_kv_heads)
    block_d = triton.next_power_of_2(head_dim)
    _store_kv_kernel[(num_tokens,)](
        k,
        v,
        k_pool,
        v_pool,
        ks,
        vs,
        slots,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_pool.stride(0),
        k_pool.stride(1),
        v_pool.stride(0),
        v_pool.stride(1),
        ks.stride(0),
        vs.stride(0),
        num_kv_heads,
        head_dim,
        QUANTIZE=quantize,
        BLOCK_KV=block_kv,
        BLOCK_D=block_d,
        num_warps=4 if block_kv * block_d <= 2048 else 8,
    )
