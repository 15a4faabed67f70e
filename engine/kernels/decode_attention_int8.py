"""Stage 1 of decode attention over an int8 pool on CUDA cores (a candidate, not the default):
the loop over one split's key blocks, which `_decode_split_kernel` runs with `CUDA_CORES`.

The default stage 1 (`engine/kernels/decode_attention.py`) pads a kv head's G query heads to 16
rows for `tl.dot` and sends every int8 block through shared memory once it is converted, which
measured at a third of the bf16 kernel's bandwidth. This one computes in float32 on CUDA cores
with no padding: a program (one sequence, kv head and split, as there) converts each int8 block
once (an integer add and a bitcast, `int8_to_fp32`) and multiplies it into all G query heads
([G, BLOCK_N, D] products summed over D for the scores, over the keys for the output), with the
K scales on the scores and the V scales on the probabilities. Per element that is G
multiply-adds and three integer or float operations, against the half byte it costs to read.
`decode_attention` runs it when `decode_attention.INT8_STAGE1 == "cuda_cores"`;
scripts/attention_bench.py times both. The kernel's split bounds, query load and scratch
stores are shared with the default loop, so the same stage 2 merges the splits.
"""

from __future__ import annotations

import triton
import triton.language as tl

from engine.kernels._int8 import int8_to_fp32

__all__ = ["int8_split_on_cuda_cores"]


@triton.jit
def int8_split_on_cuda_cores(
    q,
    k_ptr,
    v_ptr,
    k_scale_ptr,
    v_scale_ptr,
    req_to_token_ptr,
    row,
    kv_head,
    split_start,
    split_end,
    sm_scale_log2,
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
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One split's keys for the [BLOCK_G, D] queries `q`: (acc [BLOCK_G, D], m_i, l_i) in float32,
    the online softmax's state in log2 units, as the default loop leaves it."""
    offs_d = tl.arange(0, HEAD_DIM)
    q = q.to(tl.float32) * sm_scale_log2  # scores come out in log2 units
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

    return acc, m_i, l_i
