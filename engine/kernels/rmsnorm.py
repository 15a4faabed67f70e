"""RMSNorm with an optional fused residual add, one program per token row.

Same math, in the same order, as `engine.layers.norm.RMSNorm`:

    x      = dtype(x + residual)                      # the new residual stream, when given
    normed = dtype(x32 * rsqrt(mean(x32 ** 2) + eps))  # in float32
    y      = out_dtype(weight * normed)                # out_dtype = promote(weight, x)

The whole row sits in registers (hidden sizes up to `MAX_HIDDEN_SIZE`), so a row is read once
and `out` may alias `x`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._rounding import round_to

__all__ = ["MAX_HIDDEN_SIZE", "rms_norm"]

MAX_HIDDEN_SIZE = 65536


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    stride_x,
    stride_r,
    stride_out,
    hidden_size,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden_size
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r_ptrs = residual_ptr + row * stride_r + cols
        x = round_to(x + tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32), x_ptr.dtype.element_ty)
        tl.store(r_ptrs, x, mask=mask)  # residual <- x + residual, in place
        x = x.to(tl.float32)
    mean_square = tl.sum(x * x, axis=0) / hidden_size
    normed = round_to(x * tl.math.rsqrt(mean_square + eps), x_ptr.dtype.element_ty)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = round_to(w * normed.to(tl.float32), out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_out + cols, y, mask=mask)


def _check_rows(
    name: str, t: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype, device: torch.device
) -> None:
    if t.shape != shape or t.dtype != dtype or t.device != device or t.stride(-1) != 1:
        raise ValueError(
            f"{name} must be a {list(shape)} {dtype} tensor on {device} with a contiguous last dim, "
            f"got {list(t.shape)} {t.dtype} on {t.device} strides {t.stride()}"
        )


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [T, H], weight [H] -> y [T, H]; with `residual` [T, H]: (y, residual).

    With a residual, `x + residual` is written in place into `residual`'s buffer, which is
    returned as the new residual stream (the reference returns a new tensor with the same
    values); y is the norm of that sum. `out` ([T, H], dtype promote(x, weight); may alias x,
    not residual) receives y; without it a new tensor is returned. Rows may be strided; the
    last dim must be contiguous.
    """
    if x.dim() != 2 or x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or x.stride(-1) != 1:
        raise ValueError(
            f"x must be a float32/bfloat16/float16 [T, H] tensor with a contiguous last dim, "
            f"got {list(x.shape)} {x.dtype} strides {x.stride()}"
        )
    num_tokens, hidden_size = x.shape
    if hidden_size > MAX_HIDDEN_SIZE:
        raise ValueError(f"hidden size {hidden_size} exceeds {MAX_HIDDEN_SIZE}")
    if weight.shape != (hidden_size,) or not weight.is_floating_point() or not weight.is_contiguous():
        raise ValueError(
            f"weight must be a contiguous float [{hidden_size}] tensor, got {list(weight.shape)} {weight.dtype}"
        )
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device}, x on {x.device}")
    if residual is not None:
        _check_rows("residual", residual, (num_tokens, hidden_size), x.dtype, x.device)
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    if out is None:
        out = torch.empty(num_tokens, hidden_size, dtype=out_dtype, device=x.device)
    else:
        _check_rows("out", out, (num_tokens, hidden_size), out_dtype, x.device)
        if residual is not None and out.data_ptr() == residual.data_ptr():
            raise ValueError("out must not alias residual")
    if num_tokens > 0:
        block = triton.next_power_of_2(hidden_size)
        _rms_norm_kernel[(num_tokens,)](
            x,
            residual if residual is not None else x,  # placeholder, never read without HAS_RESIDUAL
            weight,
            out,
            x.stride(0),
            residual.stride(0) if residual is not None else 0,
            out.stride(0),
            hidden_size,
            eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK=block,
            num_warps=min(max(block // 256, 1), 16),
        )
    return out if residual is None else (out, residual)
