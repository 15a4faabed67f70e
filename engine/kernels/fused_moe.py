"""Fused mixture-of-experts MLP: tokens sorted by expert, grouped GEMMs, no host synchronisation.

`fused_experts(x, w13, w2, weights, ids)` computes what `engine.layers.moe.fused_experts_torch`
computes: sum_j weights[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])) with e = ids[t, j].

1. Alignment (`moe_align`): the T * top_k (token, choice) pairs, numbered p = t * top_k + j,
   are grouped by expert in blocks of BLOCK_M rows: expert e's pairs (in order of p) fill rows
   [start_e, start_e + count_e) of `sorted_pairs`, and its rows are padded to a multiple of
   BLOCK_M with the sentinel T * top_k; `block_expert[b]` is the expert of block b, or E for
   the blocks past the last expert's. One program per expert counts its pairs, a cumsum on the
   device gives the starts, and one program per expert writes its pairs. Every size is fixed by
   T, top_k and E alone (the padded length is at most T * top_k + min(T * top_k, E) *
   (BLOCK_M - 1)), and nothing is read back to the host, so a CUDA graph captures it.
2. GEMM 1: each program takes one block (one expert) and BLOCK_N columns of that expert's
   gate | up: [BLOCK_M pairs, H] @ w13[e].T, gathering each pair's token row of x; the result
   lands in pair order ([T * top_k, 2I], x's dtype). Blocks of no expert return at once.
3. SiLU-and-mul (`engine.kernels.silu_and_mul`): [T * top_k, I].
4. GEMM 2: the same grouping over w2, each row rounded to x's dtype (as the torch path's
   product is), then scaled by its routing weight, in float32 ([T * top_k, H]).
5. The top_k rows of each token are summed in float32 and rounded to x's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._rounding import round_to

__all__ = ["fused_experts", "moe_align"]

_SCAN_BLOCK = 1024


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, n, BLOCK: tl.constexpr):
    expert = tl.program_id(0)
    total = tl.zeros((BLOCK,), dtype=tl.int32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ids = tl.load(ids_ptr + offs, mask=offs < n, other=-1)
        total += (ids == expert).to(tl.int32)
    tl.store(counts_ptr + expert, tl.sum(total, axis=0))


@triton.jit
def _scatter_kernel(
    ids_ptr, starts_ptr, ends_ptr, sorted_ptr, block_expert_ptr, n, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr
):
    expert = tl.program_id(0)
    begin = tl.load(starts_ptr + expert)
    pos = begin
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ids = tl.load(ids_ptr + offs, mask=offs < n, other=-1)
        match = (ids == expert).to(tl.int32)
        dest = pos + tl.cumsum(match, axis=0) - 1
        tl.store(sorted_ptr + dest, offs, mask=match > 0)
        pos += tl.sum(match, axis=0)
    end = tl.load(ends_ptr + expert)
    for block in range(begin // BLOCK_M, end // BLOCK_M):
        tl.store(block_expert_ptr + block, expert)


def moe_align(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T, top_k] -> (sorted_pairs [B * block_m] int32, block_expert [B] int32): see the
    module docstring. B depends on T, top_k, E and block_m only."""
    flat = ids.reshape(-1).to(torch.int32)
    n = flat.numel()
    counts = torch.empty(num_experts, dtype=torch.int32, device=ids.device)
    _count_kernel[(num_experts,)](flat, counts, n, BLOCK=_SCAN_BLOCK)
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, dim=0, dtype=torch.int32)
    starts = ends - padded
    num_blocks = triton.cdiv(n + min(n, num_experts) * (block_m - 1), block_m)
    sorted_pairs = torch.full((num_blocks * block_m,), n, dtype=torch.int32, device=ids.device)
    block_expert = torch.full((num_blocks,), num_experts, dtype=torch.int32, device=ids.device)
    _scatter_kernel[(num_experts,)](
        flat, starts, ends, sorted_pairs, block_expert, n, BLOCK_M=block_m, BLOCK=_SCAN_BLOCK
    )
    return sorted_pairs, block_expert


@triton.jit
def _grouped_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    weights_ptr,
    sorted_ptr,
    block_expert_ptr,
    N,
    K,
    num_pairs,
    num_experts,
    stride_am,
    stride_ak,
    stride_be,
    stride_bn,
    stride_bk,
    stride_cm,
    stride_cn,
    A_ROW_DIV: tl.constexpr,  # pair p reads row p // A_ROW_DIV of a (top_k for x, 1 after)
    MUL_WEIGHTS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,  # upcast the tiles first (the CPU interpreter's 16-bit dot is wrong)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert >= num_experts:  # a block past the last expert's: no pairs
        return
    pair = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pair < num_pairs
    a_rows = (pair // A_ROW_DIV).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = (
        b_ptr + expert.to(tl.int64) * stride_be + offs_n[None, :].to(tl.int64) * stride_bn
        + offs_k[:, None] * stride_bk
    )
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if DOT_FP32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    # the product rounded to the activation dtype, as torch's is, before any weighting
    out = round_to(acc, a_ptr.dtype.element_ty).to(tl.float32)
    if MUL_WEIGHTS:
        out = out * tl.load(weights_ptr + pair, mask=valid, other=0.0)[:, None]
    c_ptrs = c_ptr + pair.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, round_to(out, c_ptr.dtype.element_ty), mask=valid[:, None] & n_mask[None, :])


def _block_m(num_pairs: int, num_experts: int) -> int:
    """Rows per block: about the pairs an expert gets, so that little of a block is padding."""
    per_expert = num_pairs / num_experts
    return 16 if per_expert <= 16 else 32 if per_expert <= 64 else 64


def _grouped_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    weights: torch.Tensor | None,
    sorted_pairs: torch.Tensor,
    block_expert: torch.Tensor,
    a_row_div: int,
    block_m: int,
) -> None:
    n_out, k_in = b.shape[1], b.shape[2]
    half = a.dtype in (torch.bfloat16, torch.float16)
    if not half:
        block_n, block_k = 64, 32  # float32 tiles: half the elements in the same shared memory
    elif block_m <= 16 or n_out < 1024:
        block_n, block_k = 64, 64  # few rows per expert (decode): more column tiles, more programs
    else:
        block_n, block_k = 128, 64
    grid = (block_expert.numel(), triton.cdiv(n_out, block_n))
    _grouped_gemm_kernel[grid](
        a, b, c, c if weights is None else weights, sorted_pairs, block_expert,
        n_out, k_in, c.shape[0], b.shape[0],
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1),
        A_ROW_DIV=a_row_div,
        MUL_WEIGHTS=weights is not None,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else None,
        DOT_FP32=not a.is_cuda,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=4 if block_m * block_n <= 64 * 64 else 8,
        num_stages=3,
    )


def _check(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> None:
    if x.dim() != 2 or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"x must be a float32/bfloat16/float16 [T, H] tensor, got {list(x.shape)} {x.dtype}")
    num_experts, hidden = w13.shape[0], x.shape[1]
    inter = w2.shape[2]
    if w13.shape != (num_experts, 2 * inter, hidden) or w2.shape != (num_experts, hidden, inter):
        raise ValueError(f"w13 must be [E, 2I, H] and w2 [E, H, I], got {list(w13.shape)} and {list(w2.shape)}")
    if w13.dtype != x.dtype or w2.dtype != x.dtype:
        raise ValueError(f"expert weights must be {x.dtype}, got {w13.dtype} and {w2.dtype}")
    if ids.dim() != 2 or ids.shape[0] != x.shape[0] or weights.shape != ids.shape:
        raise ValueError(f"ids and weights must be [T, top_k], got {list(ids.shape)} and {list(weights.shape)}")


def fused_experts(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """x [T, H], w13 [E, 2I, H] (gate | up), w2 [E, H, I], weights [T, top_k] (float), ids
    [T, top_k] (int) -> [T, H] in x's dtype: each token through its top_k experts, weighted."""
    _check(x, w13, w2, weights, ids)
    from engine.kernels.silu_and_mul import silu_and_mul

    num_tokens, top_k = ids.shape
    num_experts, hidden, inter = w2.shape
    if num_tokens == 0:
        return torch.empty(0, hidden, dtype=x.dtype, device=x.device)
    num_pairs = num_tokens * top_k
    block_m = _block_m(num_pairs, num_experts)
    sorted_pairs, block_expert = moe_align(ids, num_experts, block_m)
    gate_up = torch.empty(num_pairs, 2 * inter, dtype=x.dtype, device=x.device)
    _grouped_gemm(x, w13, gate_up, None, sorted_pairs, block_expert, top_k, block_m)
    act = silu_and_mul(gate_up)
    down = torch.empty(num_pairs, hidden, dtype=torch.float32, device=x.device)
    flat_weights = weights.reshape(-1).to(torch.float32)
    _grouped_gemm(act, w2, down, flat_weights, sorted_pairs, block_expert, 1, block_m)
    return down.view(num_tokens, top_k, hidden).sum(dim=1).to(x.dtype)
