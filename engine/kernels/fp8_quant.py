"""Per-row FP8 (e4m3) quantization of activations in one kernel, one program per row.

Same math, in the same order, as `engine.layers.fp8.quantize_fp8_rows`:

    scale[r] = max(max_k |x[r, k]| / 448, 1e-12)              # float32
    q[r, k]  = e4m3(clamp(float32(x[r, k]) / scale[r], +-448))  # round to nearest even

The plain-torch form takes seven kernels per call (abs, amax, casts, divisions, clamps); each
linear layer of an FP8 model quantizes its input once per step, so at small batches those
launches cost more than the product itself. Here a row is read twice (its maximum, then its
values) by one program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["quantize_fp8_rows_triton"]

_FP8_MAX = 448.0
_MIN_SCALE = 1e-12


@triton.jit
def _quantize_rows_kernel(
    x_ptr, q_ptr, scale_ptr, cols, stride_x, stride_q,
    FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, cols, BLOCK):
        mask = start + offs < cols
        x = tl.load(x_ptr + row * stride_x + start + offs, mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0) / FP8_MAX, MIN_SCALE)
    tl.store(scale_ptr + row, scale)
    for start in range(0, cols, BLOCK):
        mask = start + offs < cols
        x = tl.load(x_ptr + row * stride_x + start + offs, mask=mask, other=0.0).to(tl.float32)
        q = tl.clamp(tl.math.div_rn(x, scale), -FP8_MAX, FP8_MAX)
        tl.store(q_ptr + row * stride_q + start + offs, q.to(q_ptr.dtype.element_ty), mask=mask)


def quantize_fp8_rows_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [R, C] (last dimension contiguous) -> (q [R, C] float8_e4m3fn, scale [R, 1] float32)."""
    assert x.dim() == 2 and x.stride(-1) == 1, "rows of contiguous values"
    rows, cols = x.shape
    q = torch.empty((rows, cols), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows:
        block = min(4096, triton.next_power_of_2(max(cols, 16)))
        _quantize_rows_kernel[(rows,)](
            x, q, scale, cols, x.stride(0), q.stride(0),
            FP8_MAX=_FP8_MAX, MIN_SCALE=_MIN_SCALE, BLOCK=block, num_warps=4 if block >= 2048 else 2,
        )
    return q, scale
