"""FP8 (e4m3) products for a few token rows: the activations' quantization fused into the product.

At decode batch sizes the product is a matrix-vector one, bound by reading the weights. Two
separate launches per linear layer (`fp8_quant`, then `torch._scaled_mm`, whose FP8 GEMMs are
laid out for many rows) cost more there than the read itself. Here one program owns `BLOCK_N`
output columns: it finds the per-row scales of its (few) activation rows, quantizes each
`BLOCK_K` slice of them exactly as `engine.layers.fp8.quantize_fp8_rows` does, multiplies it with
the e4m3 weight slice on the tensor cores and applies both scales at the end:

    s_x[m]  = max(max_k |x[m, k]| / 448, 1e-12)
    y[m, n] = (sum_k e4m3(x[m, k] / s_x[m]) * Wq[n, k]) * s_x[m] * s_w[n]

the function `torch._scaled_mm` computes from the same codes, up to the float32 accumulation
order. Every program re-reads the activations (from L2: a few rows), which is why this is for
`MAX_ROWS` rows at most.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["MAX_ROWS", "fp8_gemv"]

MAX_ROWS = 16
_FP8_MAX = 448.0
_MIN_SCALE = 1e-12


@triton.jit
def _fp8_gemv_kernel(
    x_ptr, w_ptr, w_scale_ptr, bias_ptr, y_ptr, M, N, K, stride_x, stride_w, stride_y,
    HAS_BIAS: tl.constexpr, FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rm = tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_x
    amax = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        k_mask = start + rk < K
        x = tl.load(x_rows + start + rk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
    scale = tl.maximum(tl.max(amax, axis=1) / FP8_MAX, MIN_SCALE)  # [BLOCK_M]
    w_cols = w_ptr + rn[None, :].to(tl.int64) * stride_w
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        k_mask = start + rk < K
        x = tl.load(x_rows + start + rk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        xq = tl.clamp(tl.math.div_rn(x.to(tl.float32), scale[:, None]), -FP8_MAX, FP8_MAX).to(w_ptr.dtype.element_ty)
        w = tl.load(w_cols + start + rk[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(xq, w, acc)
    w_scale = tl.load(w_scale_ptr + rn, mask=n_mask, other=0.0)
    y = acc * scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        y = y.to(y_ptr.dtype.element_ty).to(tl.float32) + tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    y_ptrs = y_ptr + rm[:, None].to(tl.int64) * stride_y + rn[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def default_launch(n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) for an [N, K] weight: enough programs to keep
    every SM reading (two or more per SM at the widths of 7-8B models), wide K slices."""
    block_n = 16 if n <= 8192 else 32
    block_k = 256 if k >= 256 else max(32, triton.next_power_of_2(k))
    return block_n, block_k, 4, 4


def fp8_gemv(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
    launch: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """x: [M, K] bf16 / fp16 (M <= MAX_ROWS, rows contiguous); weight: [N, K] e4m3; weight_scale:
    [N, 1] float32; bias: [N] or None -> [M, N] in x's dtype. `launch` overrides `default_launch`."""
    rows, k = x.shape
    n = weight.shape[0]
    assert rows <= MAX_ROWS and x.stride(-1) == 1 and weight.stride(-1) == 1
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    block_n, block_k, warps, stages = launch or default_launch(n, k)
    _fp8_gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, weight_scale, bias if bias is not None else weight_scale, y, rows, n, k,
        x.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, FP8_MAX=_FP8_MAX, MIN_SCALE=_MIN_SCALE,
        BLOCK_M=MAX_ROWS, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )
    return y
