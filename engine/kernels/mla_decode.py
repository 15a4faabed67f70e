"""Decode attention of multi-head latent attention (the absorbed form) over the latent pool.

Each sequence b has one query per head, already in latent space: q[b, h] = [q_latent (R) | q_pe
(DR)] (engine/layers/mla.py). Its keys are the pool's entries [latent | k_pe] at the slots
req_to_token[req_indices[b], 0 .. seq_lens[b] - 1], one entry per token shared by every head;
the values are the latents themselves. The output per head is the softmax-weighted sum of the
latents, [R], which the caller takes back through kv_b_proj's value half.

Stage 1 (`_mla_split_kernel`, grid [B, head blocks, num_splits]): a program takes BLOCK_H heads
of one sequence and one split of its keys: it loads each key block once for all of those heads
(scores and the value product are tensor-core dots over [BLOCK_H, *] tiles) and keeps an online
softmax in float32, then writes its normalized partial output and log2-sum-exp (float32).
Stage 2 (torch): merges the splits, weighting each by exp2 of its log2-sum-exp. With one split
stage 1's output is the result. A sequence of length 0 (a padding row of a CUDA graph's batch)
gets zeros. Nothing reads a host value of the device tensors: a CUDA graph can hold the launch,
with `num_splits` fixed.

int8 pool: one scale per entry (slot), applied as the block is loaded.
The number of splits comes from a host int (`max_seq_len`): the launcher never synchronizes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._attention_checks import FLOAT_DTYPES, dot_precision

__all__ = ["mla_decode_attention"]

_MIN_PROGRAMS = 512  # stage-1 programs worth splitting the keys for (several per SM)
_MIN_SPLIT_KEYS = 128  # no split shorter than this many keys


@triton.jit
def _mla_split_kernel(
    Q, Pool, Scale, ReqToToken, ReqIdx, SeqLens, Out, Lse,
    sm_scale, num_heads, num_splits,
    stride_qb, stride_qh, stride_ps, stride_rt, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    R: tl.constexpr, DR: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DR: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, IS_INT8: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(2)
    seq_len = tl.load(SeqLens + b).to(tl.int32)
    row = tl.load(ReqIdx + b).to(tl.int64)
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_r = tl.arange(0, BLOCK_R)
    offs_dr = tl.arange(0, BLOCK_DR)
    h_mask = heads < num_heads
    r_mask = offs_r < R
    dr_mask = offs_dr < DR
    q_rows = Q + b * stride_qb + heads[:, None] * stride_qh
    q_lat = tl.load(q_rows + offs_r[None, :], mask=h_mask[:, None] & r_mask[None, :], other=0.0)
    q_pe = tl.load(q_rows + R + offs_dr[None, :], mask=h_mask[:, None] & dr_mask[None, :], other=0.0)

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        n_mask = pos < end
        slots = tl.load(ReqToToken + row * stride_rt + pos, mask=n_mask, other=0).to(tl.int64)
        entry = Pool + slots[:, None] * stride_ps
        k_lat = tl.load(entry + offs_r[None, :], mask=n_mask[:, None] & r_mask[None, :], other=0.0)
        k_pe = tl.load(entry + R + offs_dr[None, :], mask=n_mask[:, None] & dr_mask[None, :], other=0.0)
        if IS_INT8:
            scale = tl.load(Scale + slots, mask=n_mask, other=0.0).to(tl.float32)
            k_lat = (k_lat.to(tl.float32) * scale[:, None]).to(q_lat.dtype)
            k_pe = (k_pe.to(tl.float32) * scale[:, None]).to(q_lat.dtype)
        else:
            k_lat = k_lat.to(q_lat.dtype)
            k_pe = k_pe.to(q_lat.dtype)
        scores = tl.dot(q_lat, tl.trans(k_lat), input_precision=PRECISION)
        scores += tl.dot(q_pe, tl.trans(k_pe), input_precision=PRECISION)
        scores = tl.where(n_mask[None, :], scores * qk_scale, float("-inf"))  # [BLOCK_H, BLOCK_N], log2 units
        m_new = tl.maximum(m, tl.max(scores, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(scores - m_new[:, None])
        denom = denom * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(k_lat.dtype), k_lat, input_precision=PRECISION)
        m = m_new

    out_rows = Out + b * stride_ob + heads[:, None] * stride_oh + split * stride_os
    lse_at = Lse + b * stride_lb + heads * stride_lh + split
    if start < end:
        tl.store(out_rows + offs_r[None, :], acc / denom[:, None], mask=h_mask[:, None] & r_mask[None, :])
        tl.store(lse_at, m + tl.log2(denom), mask=h_mask)
    else:  # a split past this sequence's end: no weight in the merge
        tl.store(out_rows + offs_r[None, :], tl.zeros([BLOCK_H, BLOCK_R], tl.float32),
                 mask=h_mask[:, None] & r_mask[None, :])
        tl.store(lse_at, tl.full([BLOCK_H], float("-inf"), tl.float32), mask=h_mask)


def _num_splits(batch: int, head_blocks: int, max_seq_len: int) -> int:
    """Enough programs to fill the GPU, no split under `_MIN_SPLIT_KEYS` keys."""
    wanted = triton.cdiv(_MIN_PROGRAMS, batch * head_blocks)
    return max(1, min(wanted, triton.cdiv(max_seq_len, _MIN_SPLIT_KEYS)))


def mla_decode_attention(
    q: torch.Tensor,
    pool: torch.Tensor,
    req_to_token: torch.Tensor,
    req_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    kv_lora_rank: int,
    scale: float,
    max_seq_len: int,
    pool_scale: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """q [B, H, R + DR] (latent-space queries) over pool [num_slots + 1, 1, R + DR] (float, or
    int8 with `pool_scale` [num_slots + 1, 1]) -> the latent outputs [B, H, R] in q's dtype.

    req_to_token: [rows, max_len] int32; req_indices, seq_lens: [B]; `max_seq_len` bounds
    seq_lens (a host int: it sizes the splits without a sync); `num_splits` overrides them.
    """
    batch, num_heads, width = q.shape
    rope_dim = width - kv_lora_rank
    if q.dtype not in FLOAT_DTYPES or rope_dim <= 0:
        raise ValueError(f"q must be float [B, H, kv_lora_rank + rope dim], got {q.dtype} {tuple(q.shape)}")
    if pool.dim() != 3 or pool.shape[1] != 1 or pool.shape[2] != width or pool.stride(2) != 1:
        raise ValueError(f"pool must be [num_slots + 1, 1, {width}], got {tuple(pool.shape)}")
    if (pool.dtype == torch.int8) != (pool_scale is not None):
        raise ValueError("an int8 pool takes its per-slot scales; a float pool takes none")
    q = q.contiguous()
    block_r = max(16, triton.next_power_of_2(kv_lora_rank))
    # A program's float32 accumulator is [BLOCK_H, BLOCK_R]: 16 heads at a wide latent (512),
    # more at narrow ones; never under 16 rows (tl.dot's smallest tile).
    block_h = max(16, min(16 if block_r >= 256 else 64, triton.next_power_of_2(num_heads)))
    head_blocks = triton.cdiv(num_heads, block_h)
    splits = num_splits or _num_splits(batch, head_blocks, max_seq_len)
    partial = torch.empty(batch, num_heads, splits, kv_lora_rank, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, num_heads, splits, dtype=torch.float32, device=q.device)
    _mla_split_kernel[(batch, head_blocks, splits)](
        q, pool, pool_scale if pool_scale is not None else pool, req_to_token, req_indices, seq_lens, partial, lse,
        scale, num_heads, splits,
        q.stride(0), q.stride(1), pool.stride(0), req_to_token.stride(0),
        partial.stride(0), partial.stride(1), partial.stride(2), lse.stride(0), lse.stride(1),
        R=kv_lora_rank, DR=rope_dim, BLOCK_R=block_r, BLOCK_DR=max(16, triton.next_power_of_2(rope_dim)),
        BLOCK_H=block_h, BLOCK_N=16 if block_r >= 256 else 32, IS_INT8=pool.dtype == torch.int8,
        PRECISION=dot_precision(q.dtype),
    )
    if splits == 1:
        return partial[:, :, 0].to(q.dtype)
    # A padding row of a CUDA graph's batch (seq len 0) has only empty splits: zeros, not NaN.
    top = lse.amax(dim=-1, keepdim=True).clamp(min=-1e30)
    weights = torch.exp2(lse - top)  # [B, H, S]: 0 for an empty split
    merged = (partial * weights.unsqueeze(-1)).sum(dim=2) / weights.sum(dim=-1, keepdim=True).clamp(min=1e-30)
    return merged.to(q.dtype)
