"""Stage 1 of decode attention over an int8 pool on CUDA cores (a candidate, not the default).

The default stage 1 (`engine/kernels/decode_attention.py`) pads a kv head's G query heads to 16
rows for `tl.dot` and sends every int8 block through shared memory once it is converted, which
measured at a third of the bf16 kernel's bandwidth. This one computes in float32 on CUDA cores
with no padding: a program (one sequence, kv head and split, as there) converts each int8 block
once (an integer add and a bitcast, `int8_to_fp32`) and multiplies it into all G query heads
([G, BLOCK_N, D] products summed over D for the scores, over the keys for the output), with the
K scales on the scores and the V scales on the probabilities. Per element that is G
multiply-adds and three integer or float operations, against the half byte it costs to read.
`decode_attention` runs it when `decode_attention.INT8_STAGE1 == "cuda_cores"`;
scripts/attention_bench.py times both. Outputs and scratch are those of the default stage 1,
so the same stage 2 merges the splits.
"""

from __future__ import annotations

import triton
import triton.language as tl

from engine.kernels._int8 import int8_to_fp32
from engine.kernels.decode_attention import _split_len

__all__ = ["decode_split_int8_kernel"]


@triton.jit
def decode_split_int8_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    k_scale_ptr,
    v_scale_ptr,
    req_to_token_ptr,
    req_indices_ptr,
    seq_lens_ptr,
    mid_o_ptr,
    mid_lse_ptr,
    sm_scale_log2,
    window,
    stride_qb,
    stride_qh,
    stride_qd,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_kss,
    stride_ksh,
    stride_vss,
    stride_vsh,
    stride_rr,
    stride_rp,
    stride_mob,
    stride_moh,
    stride_mos,
    stride_mod,
    stride_mlb,
    stride_mlh,
    stride_mls,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    num_splits,
    BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    first_key = 0
    if HAS_WINDOW:
        first_key = tl.maximum(seq_len - window, 0)
    split_len = _split_len(seq_len - first_key, num_splits, BLOCK_N)
    split_start = first_key + split * split_len
    if split_start >= seq_len:
        return  # stage 2 only reads the splits that hold keys
    split_end = tl.minimum(split_start + split_len, seq_len)
    row = tl.load(req_indices_ptr + b).to(tl.int64)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    g_mask = offs_g < GROUP  # BLOCK_G: GROUP rounded up to a power of two
    heads = kv_head * GROUP + offs_g
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=g_mask[:, None],
        other=0.0,
    ).to(tl.float32)
    q = q * sm_scale_log2  # [BLOCK_G, D]: scores come out in log2 units

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    for block_start in range(split_start, split_end, BLOCK_N):
        pos = block_start + tl.arange(0, BLOCK_N)
        valid = pos < split_end
        slots = tl.load(req_to_token_ptr + row * stride_rr + pos * stride_rp, mask=valid, other=0)
        slots = slots.to(tl.int64)  # slot * stride overflows int32 in large pools
        k = tl.load(
            k_ptr + slots[:, None] * stride_ks + kv_head * stride_kh + offs_d[None, :] * stride_kd,
            mask=valid[:, None],
            other=0,
        )
        k = int8_to_fp32(k)  # [BLOCK_N, D]
        k_scale = tl.load(k_scale_ptr + slots * stride_kss + kv_head * stride_ksh, mask=valid, other=0.0)
        s = tl.sum(q[:, None, :] * k[None, :, :], 2) * k_scale.to(tl.float32)[None, :]  # [BLOCK_G, BLOCK_N]
        s = tl.where(valid[None, :], s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every block holds a valid key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)

        v = tl.load(
            v_ptr + slots[:, None] * stride_vs + kv_head * stride_vh + offs_d[None, :] * stride_vd,
            mask=valid[:, None],
            other=0,
        )
        v = int8_to_fp32(v)  # [BLOCK_N, D]
        v_scale = tl.load(v_scale_ptr + slots * stride_vss + kv_head * stride_vsh, mask=valid, other=0.0)
        p = p * v_scale.to(tl.float32)[None, :]  # sum_n p s_n v_n: the scale on the probabilities
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], 1)  # [BLOCK_G, D]
        m_i = m_new

    tl.store(
        mid_o_ptr + b * stride_mob + heads[:, None] * stride_moh + split * stride_mos + offs_d[None, :] * stride_mod,
        acc / l_i[:, None],
        mask=g_mask[:, None],
    )
    tl.store(mid_lse_ptr + b * stride_mlb + heads * stride_mlh + split * stride_mls, m_i + tl.log2(l_i), mask=g_mask)
