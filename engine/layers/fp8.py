"""FP8 (e4m3) linear layers: weights quantized per output channel, activations per token.

`--quantization fp8` quantizes every linear layer of a bf16 / fp16 model once, after its
weights are loaded (the LM head and the embedding keep theirs):

- weight W [N, K] -> Wq [N, K] float8_e4m3fn and a float32 scale per output row,
  s_w[n] = max_k |W[n, k]| / 448 (448: e4m3's largest finite value), Wq = round(W / s_w);
- each step's activations x [T, K] -> xq [T, K] e4m3 and a scale per token row,
  s_x[t] = max_k |x[t, k]| / 448, computed on the fly;
- y = (xq @ Wq.T) * s_x * s_w (+ bias), accumulated in float32 and rounded to x's dtype.

On a GPU with FP8 tensor cores (compute capability 8.9 or more: Ada, Hopper) the product is one
`torch._scaled_mm` with row-wise scales; elsewhere (the CPU, older GPUs) the same function is
computed from the dequantized operands in float32 — slower, for correctness checks. On the GPU
the activations are quantized by one Triton kernel (`engine.kernels.fp8_quant`), equal to
`quantize_fp8_rows` bit for bit. With the `decode_gemv` setting, products of a few token rows
take `engine.kernels.gemv.fp8_gemv` instead: the quantization inside the product, on the CUDA cores.
"""

from __future__ import annotations

import functools

import torch

from engine.layers.backend import use_decode_gemv

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
_MIN_SCALE = 1e-12  # an all-zero row gets zeros, not NaN


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [R, C] -> (q [R, C] float8_e4m3fn, scale [R, 1] float32), x ~= q * scale row by row."""
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp(min=_MIN_SCALE)
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


@functools.cache
def _has_fp8_gemm(device_index: int) -> bool:
    """Whether `torch._scaled_mm` with row-wise scales runs on this GPU (checked once, by trying)."""
    if torch.cuda.get_device_capability(device_index) < (8, 9):
        return False
    device = torch.device("cuda", device_index)
    a = torch.zeros(16, 32, device=device, dtype=FP8_DTYPE)
    b = torch.zeros(16, 32, device=device, dtype=FP8_DTYPE)
    try:
        torch._scaled_mm(
            a, b.t(), scale_a=torch.ones(16, 1, device=device), scale_b=torch.ones(1, 16, device=device),
            out_dtype=torch.bfloat16,
        )
    except RuntimeError:
        return False
    return True


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x: [T, K] bf16 / fp16 / fp32; weight: [N, K] e4m3; weight_scale: [N, 1] float32 -> [T, N] in x's dtype."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and _has_fp8_gemm(x.device.index or 0):
        x = x if x.stride(-1) == 1 else x.contiguous()
        if use_decode_gemv(x.shape[0]):  # a few rows: quantized inside the product (one launch)
            from engine.kernels.gemv import fp8_gemv  # Triton only where a GPU is

            return fp8_gemv(x, weight, weight_scale, bias)
        from engine.kernels.fp8_quant import quantize_fp8_rows_triton

        xq, x_scale = quantize_fp8_rows_triton(x)
        y = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale.t(), out_dtype=x.dtype)
    else:  # the same product from the dequantized operands, in float32
        xq, x_scale = quantize_fp8_rows(x)
        y = ((xq.float() * x_scale) @ (weight.float() * weight_scale).t()).to(x.dtype)
    return y if bias is None else y + bias
