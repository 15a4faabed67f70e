"""Decode attention over the token-granular KV pool (flash-decoding, GQA head grouping).

Each sequence b has one query token q[b] ([H, D]) at position seq_lens[b] - 1 and keys at
positions 0 .. seq_lens[b] - 1, whose slots are req_to_token[req_indices[b], pos].

Stage 1 (`_decode_split_kernel`, grid [B, KV, num_splits]): one program takes one kv head
and one split of the sequence's keys; it loads the split's K/V once for all
G = H // KV query heads of the group (a [BLOCK_G, D] query tile, so the scores are a tensor
core dot) and keeps an online softmax in float32. It writes the split's normalized partial
output and its log2-sum-exp to float32 scratch buffers.
Stage 2 (`_decode_reduce_kernel`, grid [B, H]): merges the splits of each (sequence, head).
With one split per sequence (a large batch: a CUDA graph's launch at 512 sequences) stage 1
writes the output itself and there is no stage 2.

The number of splits S comes from a host int (`max_seq_len`, which the caller knows, or
`num_splits` itself), never from the device tensors, so the launcher never synchronizes and a
CUDA graph can hold the launch. Each sequence cuts its own keys into splits of
ceil(num_keys / S) positions rounded up to a whole key block, on the device: a short sequence
in a batch sized for long ones gets short splits, and programs past its end exit at once.
With a sliding window W the splits start at the window's first key.

With ALiBi slopes (`HAS_ALIBI`, a compile-time flag: other models compile the kernels as
before) head h adds slope_h * (key position - (seq_len - 1)) to its scores in stage 1, in
float32; the splits' log2-sum-exps carry it into stage 2 unchanged.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._attention_checks import check_alibi_slopes, check_q_and_pools, dot_precision
from engine.kernels._int8 import int8_pv_dot, int8_to_fp16

__all__ = ["decode_attention"]

_LOG2E = 1.4426950408889634
# Scratch is float32: [B, H, num_splits, D] partial outputs, [B, H, num_splits] log2-sum-exps.
_REDUCE_CHUNK = 16  # splits merged per iteration of stage 2
_MIN_PROGRAMS = 1024  # stage-1 programs worth splitting finer for (several per SM)
# Stage-1 programs beyond which splits get longer instead: bounds the float32 scratch (programs x
# group x head_dim x 4 bytes, ~128 MiB at the 8B shape) and keeps its offsets in int32 however
# many sequences and keys a step has (512 sequences of 128k keys would otherwise take 4 GiB).
_MAX_PROGRAMS = 64 * 1024
# On a GPU, int8 K/V become fp16 through inline PTX (engine/kernels/_int8.py); False keeps the
# add-and-bitcast way the CPU interpreter runs (scripts/attention_bench.py times both).
INT8_ASM = True
# With INT8_ASM: keep each conversion where its block was loaded (engine/kernels/_int8.py says
# why). On an H200 it only pays with blocks of 128 keys (docs/benchmarks.md).
INT8_PINNED = True
# (keys per block, warps, pipeline stages) of the tensor-core stage 1 over an int8 pool on a GPU;
# None: the float pools' (64, 4, 2). An int8 block of 128 keys moves the bytes of a bf16 block
# of 64, and a third stage hides more of the gathered loads: with the conversions pinned it was
# the fastest launch tried on an H200 (docs/benchmarks.md, run of 2026-12-01 22:45);
# scripts/attention_bench.py times others.
INT8_TC_LAUNCH: tuple[int, int, int] | None = (128, 4, 3)
# (keys per block, warps, pipeline stages) of stage 1 over a float pool on a GPU
# (scripts/attention_bench.py --decode-launches times others).
FLOAT_LAUNCH: tuple[int, int, int] = (64, 4, 2)


@triton.jit
def _split_len(num_keys, num_splits, BLOCK_N: tl.constexpr):
    """Keys per split of a sequence with `num_keys` keys: a whole number of key blocks (>= 1)."""
    blocks = tl.cdiv(tl.cdiv(num_keys, BLOCK_N), num_splits)
    return tl.maximum(blocks, 1) * BLOCK_N


@triton.jit
def _decode_split_kernel(
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
    out_ptr,
    slopes_ptr,
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
    stride_ob,
    stride_oh,
    stride_od,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    num_splits,
    BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    IS_INT8: tl.constexpr,
    INT8_AS_FP16: tl.constexpr,
    INT8_ASM: tl.constexpr,
    INT8_PINNED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DIRECT: tl.constexpr,  # one split: the output itself, no scratch and no stage 2
    HAS_ALIBI: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    g_mask = offs_g < GROUP  # padded to BLOCK_G >= 16 rows for tl.dot
    heads = kv_head * GROUP + offs_g
    out_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od

    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    first_key = 0
    if HAS_WINDOW:
        first_key = tl.maximum(seq_len - window, 0)  # keys at pos <= seq_len - 1 - window are out
    split_len = _split_len(seq_len - first_key, num_splits, BLOCK_N)
    split_start = first_key + split * split_len
    if split_start >= seq_len:
        if DIRECT:  # a sequence without keys gets zeros
            zeros = tl.zeros([BLOCK_G, HEAD_DIM], dtype=out_ptr.dtype.element_ty)
            tl.store(out_ptrs, zeros, mask=g_mask[:, None])
        return  # stage 2 only reads the splits that hold keys
    split_end = tl.minimum(split_start + split_len, seq_len)
    row = tl.load(req_indices_ptr + b).to(tl.int64)
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=g_mask[:, None],
        other=0.0,
    )  # [BLOCK_G, D]
    if INT8_AS_FP16:
        q = q.to(tl.float16)  # exact for bf16 values in fp16's range
    slope_log2 = tl.zeros([BLOCK_G], dtype=tl.float32)
    if HAS_ALIBI:  # per query head of the group, in the scores' log2 units
        slope_log2 = tl.load(slopes_ptr + heads, mask=g_mask, other=0.0).to(tl.float32) * 1.4426950408889634

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    # Every block of the loop holds at least one valid key, so m_i is finite after the first.
    for block_start in range(split_start, split_end, BLOCK_N):
        pos = block_start + tl.arange(0, BLOCK_N)
        valid = pos < split_end
        slots = tl.load(req_to_token_ptr + row * stride_rr + pos * stride_rp, mask=valid, other=0)
        slots = slots.to(tl.int64)  # slot * stride overflows int32 in large pools
        k = tl.load(
            k_ptr + slots[:, None] * stride_ks + kv_head * stride_kh + offs_d[None, :] * stride_kd,
            mask=valid[:, None],
            other=0.0,
        )  # [BLOCK_N, D]
        # int8 values are exact in fp16/bf16; the per-slot scale is applied to the fp32 scores.
        if INT8_AS_FP16:
            k = int8_to_fp16(k, INT8_ASM, INT8_PINNED)
        qk = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION)  # [BLOCK_G, BLOCK_N] fp32
        if IS_INT8:
            k_scale = tl.load(k_scale_ptr + slots * stride_kss + kv_head * stride_ksh, mask=valid, other=0.0)
            qk = qk * k_scale.to(tl.float32)[None, :]
        if HAS_ALIBI:
            distance = (pos - (seq_len - 1)).to(tl.float32)  # <= 0: the query is the last token
            qk = tl.where(valid[None, :], qk * sm_scale_log2 + slope_log2[:, None] * distance[None, :], float("-inf"))
        else:
            qk = tl.where(valid[None, :], qk * sm_scale_log2, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)

        v = tl.load(
            v_ptr + slots[:, None] * stride_vs + kv_head * stride_vh + offs_d[None, :] * stride_vd,
            mask=valid[:, None],
            other=0.0,
        )  # [BLOCK_N, D]
        if IS_INT8:
            # sum_n p[g, n] * (v[n] * s[n]) = sum_n (p[g, n] * s[n]) * v[n]: the scale goes on the
            # [BLOCK_G, BLOCK_N] probabilities, not on the [BLOCK_N, D] values.
            v_scale = tl.load(v_scale_ptr + slots * stride_vss + kv_head * stride_vsh, mask=valid, other=0.0)
            v_scale = v_scale.to(tl.float32)
            if INT8_AS_FP16:
                acc = acc * alpha[:, None] + int8_pv_dot(p, v, v_scale, INT8_ASM, DOT_PRECISION, INT8_PINNED)
            else:
                pv = p * v_scale[None, :]
                acc = acc * alpha[:, None] + tl.dot(pv.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
        m_i = m_new

    mid_o = acc / l_i[:, None]
    if DIRECT:
        tl.store(out_ptrs, mid_o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
        return
    tl.store(
        mid_o_ptr
        + b * stride_mob
        + heads[:, None] * stride_moh
        + split * stride_mos
        + offs_d[None, :] * stride_mod,
        mid_o,
        mask=g_mask[:, None],
    )
    tl.store(
        mid_lse_ptr + b * stride_mlb + heads * stride_mlh + split * stride_mls,
        m_i + tl.log2(l_i),
        mask=g_mask,
    )


@triton.jit
def _decode_reduce_kernel(
    mid_o_ptr,
    mid_lse_ptr,
    out_ptr,
    seq_lens_ptr,
    window,
    stride_mob,
    stride_moh,
    stride_mos,
    stride_mod,
    stride_mlb,
    stride_mlh,
    stride_mls,
    stride_ob,
    stride_oh,
    stride_od,
    num_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
):
    b = tl.program_id(0)
    head = tl.program_id(1)

    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    num_keys = seq_len
    if HAS_WINDOW:
        num_keys = tl.minimum(seq_len, window)
    # The splits stage 1 wrote for this sequence (none without keys).
    num_written = tl.cdiv(num_keys, _split_len(num_keys, num_splits, BLOCK_N))

    offs_d = tl.arange(0, HEAD_DIM)
    m_i = float("-inf")
    l_i = 0.0
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for s0 in range(0, num_written, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_mask = offs_s < num_written
        lse = tl.load(
            mid_lse_ptr + b * stride_mlb + head * stride_mlh + offs_s * stride_mls,
            mask=s_mask,
            other=float("-inf"),
        )  # [BLOCK_S]
        part = tl.load(
            mid_o_ptr
            + b * stride_mob
            + head * stride_moh
            + offs_s[:, None] * stride_mos
            + offs_d[None, :] * stride_mod,
            mask=s_mask[:, None],
            other=0.0,
        )  # [BLOCK_S, D]
        m_new = tl.maximum(m_i, tl.max(lse, 0))  # finite: each chunk holds a written split
        alpha = tl.exp2(m_i - m_new)
        w = tl.exp2(lse - m_new)
        acc = acc * alpha + tl.sum(w[:, None] * part, 0)
        l_i = l_i * alpha + tl.sum(w, 0)
        m_i = m_new

    l_i = tl.where(l_i > 0.0, l_i, 1.0)  # a sequence without keys gets zeros, not NaN
    out = acc / l_i
    tl.store(
        out_ptr + b * stride_ob + head * stride_oh + offs_d * stride_od, out.to(out_ptr.dtype.element_ty)
    )


def _check_inputs(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    req_to_token: torch.Tensor,
    req_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    out: torch.Tensor | None,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    sliding_window: int | None,
    alibi_slopes: torch.Tensor | None,
) -> None:
    check_q_and_pools(q, k_pool, v_pool, req_to_token, k_scale, v_scale, "batch")
    check_alibi_slopes(alibi_slopes, q.shape[1], q.device)
    batch, num_heads, head_dim = q.shape
    for name, t in (("req_indices", req_indices), ("seq_lens", seq_lens)):
        if t.dim() != 1 or t.shape[0] != batch or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32/int64 of shape [{batch}], got {t.dtype} {tuple(t.shape)}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype):
        raise ValueError(f"out must be {q.dtype} {tuple(q.shape)}, got {out.dtype} {tuple(out.shape)}")
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")
    tensors = [k_pool, v_pool, req_to_token, req_indices, seq_lens, out, k_scale, v_scale]
    devices = {t.device for t in tensors if t is not None}
    if devices != {q.device}:
        raise ValueError(f"all tensors must be on q's device {q.device}, got {sorted(map(str, devices))}")


def _block_n(device: torch.device) -> int:
    # Under the CPU interpreter, small blocks keep it fast and exercise several blocks per split.
    return 16 if device.type == "cpu" else 64


def default_num_splits(device: torch.device, num_groups: int, num_keys: int) -> int:
    """Splits per sequence for `num_groups` (sequence, kv head) pairs of up to `num_keys` keys.

    Long splits amortize stage 2; more of them fill the GPU when the batch is small (a
    program per SM is not enough to hide the latency of the gathered loads): splits of 256
    keys, halved down to 64 until there are `_MIN_PROGRAMS` programs, doubled while there are
    more than `_MAX_PROGRAMS` (very long contexts in a large batch). Under the CPU
    interpreter, splits of 32 keys exercise several splits at tiny shapes.
    """
    if device.type == "cpu":
        return triton.cdiv(num_keys, 32)
    block_seq = 256
    while block_seq > 64 and num_groups * triton.cdiv(num_keys, block_seq) < _MIN_PROGRAMS:
        block_seq //= 2
    while block_seq < num_keys and num_groups * triton.cdiv(num_keys, block_seq) > _MAX_PROGRAMS:
        block_seq *= 2
    return triton.cdiv(num_keys, block_seq)


def graph_num_splits(device: torch.device, batch: int, num_kv_heads: int, max_keys: int) -> int:
    """A fixed number of splits for a launch captured once and replayed at any lengths.

    Enough programs to fill the GPU (`_MIN_PROGRAMS`) if every sequence were long, and never
    more splits than key blocks in `max_keys`; each sequence's splits shrink with its length.
    """
    wanted = triton.cdiv(_MIN_PROGRAMS, max(batch * num_kv_heads, 1))
    return max(1, min(wanted, triton.cdiv(max_keys, _block_n(device))))


def decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    req_to_token: torch.Tensor,
    req_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    *,
    sliding_window: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token per sequence attending to all its keys in the pool.

    q: [B, H, D]; k_pool / v_pool: [num_slots + 1, KV, D] (float, or int8 with `k_scale` /
    `v_scale` [num_slots + 1, KV]); req_to_token: [R, M] int32; req_indices, seq_lens: [B].
    Sequence b's keys are the slots req_to_token[req_indices[b], :seq_lens[b]]; with
    `sliding_window` W only the last W of them. Returns `out` (allocated when None): [B, H, D]
    in q's dtype; a sequence with seq_len 0 gets zeros.

    `max_seq_len` is an upper bound on seq_lens that sizes the grid (its number of splits);
    when None the row length of req_to_token is used, which is always a bound but launches
    more programs that exit at once. `num_splits` fixes the number of splits per sequence
    instead (a CUDA graph's launch, see `graph_num_splits`). No device value is read on the host.

    `alibi_slopes` ([H] float32 on q's device): ALiBi, head h's scores get
    slope_h * (key position - (seq_lens[b] - 1)) added.
    """
    _check_inputs(
        q, k_pool, v_pool, req_to_token, req_indices, seq_lens, out, k_scale, v_scale, sliding_window, alibi_slopes
    )
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_pool.shape[1]
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)
    if max_seq_len is None:
        max_seq_len = req_to_token.shape[1]
    num_keys = max_seq_len if sliding_window is None else min(max_seq_len, sliding_window)
    if batch == 0 or num_keys <= 0:
        return out.zero_()

    is_int8 = k_pool.dtype == torch.int8
    block_n, num_warps, num_stages = _block_n(q.device), 4, 2
    if q.is_cuda:
        block_n, num_warps, num_stages = FLOAT_LAUNCH
    if is_int8 and INT8_TC_LAUNCH is not None and q.is_cuda:
        block_n, num_warps, num_stages = INT8_TC_LAUNCH
    if num_splits is None:
        num_splits = default_num_splits(q.device, batch * num_kv_heads, num_keys)
    direct = num_splits == 1
    if direct:  # stage 1 writes `out` itself: no scratch (any tensor will do for its unused pointers)
        mid_o, mid_lse = out.unsqueeze(2), out[:, :, :1]
    else:
        mid_o = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        mid_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    # Unused pointer arguments when the pool is not int8: any tensor will do.
    ks = k_scale if k_scale is not None else seq_lens
    vs = v_scale if v_scale is not None else seq_lens
    ks_strides = k_scale.stride() if k_scale is not None else (0, 0)
    vs_strides = v_scale.stride() if v_scale is not None else (0, 0)
    window = sliding_window or 0

    grid = (batch, num_kv_heads, num_splits)
    args = (
        q, k_pool, v_pool, ks, vs, req_to_token, req_indices, seq_lens, mid_o, mid_lse, out,
        alibi_slopes if alibi_slopes is not None else seq_lens,  # unused without ALiBi
        scale * _LOG2E,
        window, *q.stride(), *k_pool.stride(), *v_pool.stride(), *ks_strides, *vs_strides,
        *req_to_token.stride(), *mid_o.stride(), *mid_lse.stride(), *out.stride(),
    )
    _decode_split_kernel[grid](
        *args,
        GROUP=group,
        BLOCK_G=max(16, triton.next_power_of_2(group)),  # tl.dot needs 16 rows
        HEAD_DIM=head_dim,
        num_splits=num_splits,
        BLOCK_N=block_n,
        HAS_WINDOW=sliding_window is not None,
        IS_INT8=is_int8,
        # Half-precision queries read int8 keys and values as fp16 (bf16 queries convert
        # exactly); float32 queries keep float32 dots.
        INT8_AS_FP16=is_int8 and q.dtype in (torch.float16, torch.bfloat16),
        INT8_ASM=INT8_ASM and q.is_cuda,
        INT8_PINNED=INT8_PINNED,
        DOT_PRECISION=dot_precision(q.dtype),
        DIRECT=direct,
        HAS_ALIBI=alibi_slopes is not None,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if direct:
        return out
    _decode_reduce_kernel[(batch, num_heads)](
        mid_o,
        mid_lse,
        out,
        seq_lens,
        window,
        *mid_o.stride(),
        *mid_lse.stride(),
        *out.stride(),
        num_splits=num_splits,
        HEAD_DIM=head_dim,
        BLOCK_N=block_n,
        BLOCK_S=_REDUCE_CHUNK,
        HAS_WINDOW=sliding_window is not None,
        num_warps=4 if head_dim >= 128 else 2,
    )
    return out
