"""SiLU-and-mul: x [T, 2 * d] laid out as [gate | up] -> silu(gate) * up [T, d].

As `engine.layers.activation.SiluAndMul`: silu is computed in float32 as g / (1 + exp(-g))
and rounded to x's dtype, then multiplied by `up` and rounded again (one rounding per torch op).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._rounding import round_to

__all__ = ["silu_and_mul"]

_MAX_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,
    out_ptr,
    stride_x,
    stride_out,
    d,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    silu = round_to(gate / (1.0 + tl.exp(-gate)), dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, round_to(silu * up, dtype), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, 2 * d] -> silu(x[:, :d]) * x[:, d:] in `out` ([T, d], x's dtype) or a new tensor.

    Rows may be strided; the last dim must be contiguous. `out` must not overlap x.
    """
    if x.dim() != 2 or x.shape[1] % 2 or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"x must be a float32/bfloat16/float16 [T, 2 * d] tensor, got {list(x.shape)} {x.dtype}"
        )
    if x.stride(-1) != 1:
        raise ValueError(f"x must have a contiguous last dim, got strides {x.stride()}")
    num_tokens, d = x.shape[0], x.shape[1] // 2
    if out is None:
        out = torch.empty(num_tokens, d, dtype=x.dtype, device=x.device)
    elif (
        out.shape != (num_tokens, d) or out.dtype != x.dtype or out.device != x.device or out.stride(-1) != 1
    ):
        raise ValueError(
            f"out must be a {x.dtype} [{num_tokens}, {d}] tensor on {x.device} with a contiguous last dim, "
            f"got {list(out.shape)} {out.dtype} on {out.device} strides {out.stride()}"
        )
    if num_tokens > 0 and d > 0:
        block = min(triton.next_power_of_2(d), _MAX_BLOCK)
        grid = (num_tokens, triton.cdiv(d, block))
        _silu_and_mul_kernel[grid](x, out, x.stride(0), out.stride(0), d, BLOCK=block, num_warps=4)
    return out
