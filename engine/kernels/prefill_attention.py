"""Packed (padding-free) causal prefill attention over a cached prefix in the KV pool.

Sequence i owns the packed query rows cu_new_lens[i] .. cu_new_lens[i + 1] - 1, at positions
start_pos[i] .. start_pos[i] + new_len_i - 1. Its keys are the slots
req_to_token[req_indices[i], :start_pos[i] + new_len_i]: the cached prefix followed by the
new tokens, whose K/V the caller stored in the pool before this runs.

One program (grid [query blocks over max_new_len, N, H]) takes BLOCK_M query rows of one head
of one sequence and walks the key blocks up to its causal limit (and from its sliding
window's first key), FlashAttention-style: scores and the online softmax in float32,
exp2 with the scale folded into log2(e). Query head h reads kv head h // (H / KV).
With ALiBi slopes (`HAS_ALIBI`, a compile-time flag: other models compile the kernel as
before) head h adds slope_h * (key position - query position) to its scores, in float32.

With a tile table (`tiles`, [2, num_tiles]: sequence, query block) the grid is
[num_tiles, H] instead and a program takes the tile its index names; a tile whose sequence is
< 0 does nothing. The grid then depends only on the table's length, not on the lengths of
the step, so a CUDA graph can capture the launch once for a token-count bucket
(`prefill_tiles` fills the table on the host; `max_prefill_tiles` bounds its length).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from engine.kernels._attention_checks import check_alibi_slopes, check_q_and_pools, dot_precision

__all__ = ["max_prefill_tiles", "prefill_attention", "prefill_block_m", "prefill_tiles"]

_LOG2E = 1.4426950408889634


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    k_scale_ptr,
    v_scale_ptr,
    req_to_token_ptr,
    req_indices_ptr,
    start_pos_ptr,
    cu_new_lens_ptr,
    out_ptr,
    tiles_ptr,
    stride_tile,
    sm_scale_log2,
    window,
    stride_qt,
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
    stride_ot,
    stride_oh,
    stride_od,
    slopes_ptr,  # last of the run-time arguments: before them it changed the registers of the others
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    IS_INT8: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_TILES: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
):
    if USE_TILES:
        seq = tl.load(tiles_ptr + tl.program_id(0)).to(tl.int32)
        if seq < 0:
            return  # a table sized for the bucket, not for this step
        m_block = tl.load(tiles_ptr + stride_tile + tl.program_id(0)).to(tl.int32)
        head = tl.program_id(1)
    else:
        m_block = tl.program_id(0)
        seq = tl.program_id(1)
        head = tl.program_id(2)
    kv_head = head // GROUP

    first_token = tl.load(cu_new_lens_ptr + seq)
    new_len = (tl.load(cu_new_lens_ptr + seq + 1) - first_token).to(tl.int32)
    if m_block * BLOCK_M >= new_len:
        return  # the grid is sized by the longest sequence
    start = tl.load(start_pos_ptr + seq).to(tl.int32)
    row = tl.load(req_indices_ptr + seq).to(tl.int64)
    seq_len = start + new_len

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # index among the new tokens
    offs_d = tl.arange(0, HEAD_DIM)
    m_valid = offs_m < new_len
    q_pos = start + offs_m  # [BLOCK_M] absolute positions
    tokens = (first_token + offs_m).to(tl.int64)
    q = tl.load(
        q_ptr + tokens[:, None] * stride_qt + head * stride_qh + offs_d[None, :] * stride_qd,
        mask=m_valid[:, None],
        other=0.0,
    )  # [BLOCK_M, D]

    # Keys this block can see: [lo, hi). The last row sees up to its own position.
    hi = tl.minimum(start + (m_block + 1) * BLOCK_M, seq_len)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(start + m_block * BLOCK_M - window + 1, 0)

    slope_log2 = 0.0
    if HAS_ALIBI:  # in the scores' log2 units, as the scale
        slope_log2 = tl.load(slopes_ptr + head).to(tl.float32) * 1.4426950408889634

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for block_start in range(lo, hi, BLOCK_N):
        k_pos = block_start + tl.arange(0, BLOCK_N)
        k_valid = k_pos < hi
        slots = tl.load(req_to_token_ptr + row * stride_rr + k_pos * stride_rp, mask=k_valid, other=0)
        slots = slots.to(tl.int64)  # slot * stride overflows int32 in large pools
        k = tl.load(
            k_ptr + slots[:, None] * stride_ks + kv_head * stride_kh + offs_d[None, :] * stride_kd,
            mask=k_valid[:, None],
            other=0.0,
        )  # [BLOCK_N, D]
        qk = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N] fp32
        if IS_INT8:
            k_scale = tl.load(
                k_scale_ptr + slots * stride_kss + kv_head * stride_ksh, mask=k_valid, other=0.0
            )
            qk = qk * k_scale.to(tl.float32)[None, :]
        allowed = k_valid[None, :] & (k_pos[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            allowed = allowed & (k_pos[None, :] > q_pos[:, None] - window)
        if HAS_ALIBI:
            distance = (k_pos[None, :] - q_pos[:, None]).to(tl.float32)  # <= 0 where allowed
            qk = tl.where(allowed, qk * sm_scale_log2 + slope_log2 * distance, float("-inf"))
        else:
            qk = tl.where(allowed, qk * sm_scale_log2, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row with no key yet (window, or a padding row) keeps m = -inf: subtract 0 instead.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)

        v = tl.load(
            v_ptr + slots[:, None] * stride_vs + kv_head * stride_vh + offs_d[None, :] * stride_vd,
            mask=k_valid[:, None],
            other=0.0,
        )  # [BLOCK_N, D]
        if IS_INT8:
            v_scale = tl.load(
                v_scale_ptr + slots * stride_vss + kv_head * stride_vsh, mask=k_valid, other=0.0
            )
            v = v.to(tl.float32) * v_scale.to(tl.float32)[:, None]
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
        m_i = m_new

    # Every valid row sees at least its own key, so l_i > 0 there; padding rows are not stored.
    l_i = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_i[:, None]
    tl.store(
        out_ptr + tokens[:, None] * stride_ot + head * stride_oh + offs_d[None, :] * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=m_valid[:, None],
    )


def _check_inputs(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    req_to_token: torch.Tensor,
    req_indices: torch.Tensor,
    start_pos: torch.Tensor,
    cu_new_lens: torch.Tensor,
    out: torch.Tensor | None,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    sliding_window: int | None,
    alibi_slopes: torch.Tensor | None,
) -> None:
    check_q_and_pools(q, k_pool, v_pool, req_to_token, k_scale, v_scale, "num_tokens")
    check_alibi_slopes(alibi_slopes, q.shape[1], q.device)
    _, num_heads, head_dim = q.shape
    num_seqs = req_indices.shape[0] if req_indices.dim() == 1 else -1
    for name, t, length in (
        ("req_indices", req_indices, num_seqs),
        ("start_pos", start_pos, num_seqs),
        ("cu_new_lens", cu_new_lens, num_seqs + 1),
    ):
        if t.dim() != 1 or t.shape[0] != length or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"{name} must be int32/int64 of shape [{length}], got {t.dtype} {tuple(t.shape)}"
            )
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype):
        raise ValueError(f"out must be {q.dtype} {tuple(q.shape)}, got {out.dtype} {tuple(out.shape)}")
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")
    tensors = [k_pool, v_pool, req_to_token, req_indices, start_pos, cu_new_lens, out, k_scale, v_scale]
    devices = {t.device for t in tensors if t is not None}
    if devices != {q.device}:
        raise ValueError(f"all tensors must be on q's device {q.device}, got {sorted(map(str, devices))}")


# (BLOCK_M, BLOCK_N, num_warps, num_stages) on a GPU. On an H100 at head_dim 128 (8 x 2048
# causal, bf16) 128 x 64 tiles with 4 warps and 3 stages were the fastest of the configurations
# tried then (about 300 TFLOP/s). Compiled for sm_90 (scripts/kernel_sass.py), that launch spills
# registers: 66 `STL` with a bf16 pool, 93 with int8; with 8 warps there are none, and half the
# instructions (scripts/attention_bench.py --prefill-launches times both). BLOCK_M is also the
# unit of the prefill graphs' tile tables: set it before any engine starts.
PREFILL_LAUNCH: tuple[int, int, int, int] = (128, 64, 4, 3)


def _launch_config(device: torch.device, head_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): `PREFILL_LAUNCH` on a GPU. Under the CPU
    interpreter, small tiles keep it fast and exercise several query and key blocks at tiny
    shapes."""
    if device.type == "cpu":
        return 16, 16, 4, 1
    return PREFILL_LAUNCH


def prefill_block_m(device: torch.device) -> int:
    """Query rows per tile of the kernel on `device` (the unit of `prefill_tiles`)."""
    return _launch_config(device, 0)[0]


def max_prefill_tiles(num_tokens: int, max_seqs: int, block_m: int) -> int:
    """Tiles any step of at most `num_tokens` new tokens in at most `max_seqs` sequences needs:
    sum(ceil(n_i / block_m)) <= num_tokens / block_m + (number of sequences)."""
    return triton.cdiv(num_tokens, block_m) + min(num_tokens, max_seqs)


def prefill_tiles(new_lens: np.ndarray, block_m: int, out: np.ndarray) -> int:
    """Write the tile table of sequences with `new_lens` new tokens into `out` ([2, n] integer:
    row 0 the sequence, row 1 the query block; the entries past the step's tiles get sequence
    -1). Returns the number of tiles."""
    counts = (new_lens + block_m - 1) // block_m
    total = int(counts.sum())
    if total > out.shape[1]:
        raise ValueError(f"{total} tiles do not fit a table of {out.shape[1]}")
    out[0, :total] = np.repeat(np.arange(len(new_lens)), counts)
    out[1, :total] = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    out[0, total:] = -1
    out[1, total:] = 0
    return total


def prefill_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    req_to_token: torch.Tensor,
    req_indices: torch.Tensor,
    start_pos: torch.Tensor,
    cu_new_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    *,
    sliding_window: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    max_new_len: int | None = None,
    tiles: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its cached prefix and themselves.

    q: [T, H, D] packed new tokens; k_pool / v_pool: [num_slots + 1, KV, D] (float, or int8
    with `k_scale` / `v_scale` [num_slots + 1, KV]); req_to_token: [R, M] int32;
    req_indices, start_pos: [N]; cu_new_lens: [N + 1] offsets of each sequence's rows in q
    (cu_new_lens[0] = 0). With `sliding_window` W, the token at position p sees keys at
    positions p - W + 1 .. p. Returns `out` (allocated when None): [T, H, D] in q's dtype;
    rows past cu_new_lens[N] are left untouched.

    `max_new_len` is an upper bound on the new lengths that sizes the grid; when None, T is
    used, which is always a bound but launches more programs that exit at once. No device
    value is read on the host.

    `tiles` ([2, num_tiles] int32/int64 on q's device, see `prefill_tiles`) replaces the grid
    over (query blocks, sequences) with one program per table entry (and head); it must name
    every query block of every sequence, with the kernel's `prefill_block_m`.

    `alibi_slopes` ([H] float32 on q's device): ALiBi, head h's scores get
    slope_h * (key position - query position) added.
    """
    _check_inputs(
        q,
        k_pool,
        v_pool,
        req_to_token,
        req_indices,
        start_pos,
        cu_new_lens,
        out,
        k_scale,
        v_scale,
        sliding_window,
        alibi_slopes,
    )
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = req_indices.shape[0]
    if out is None:
        out = torch.empty_like(q)
    if tiles is not None:
        if tiles.dim() != 2 or tiles.shape[0] != 2 or tiles.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"tiles must be int32/int64 of shape [2, num_tiles], got {tiles.dtype} {tuple(tiles.shape)}")
        if tiles.device != q.device or tiles.stride(1) != 1:
            raise ValueError("tiles must be on q's device with contiguous rows")
    if max_new_len is None:
        max_new_len = num_tokens
    if num_seqs == 0 or max_new_len <= 0 or (tiles is not None and tiles.shape[1] == 0):
        return out

    block_m, block_n, num_warps, num_stages = _launch_config(q.device, head_dim)
    is_int8 = k_pool.dtype == torch.int8
    # Unused pointer arguments when the pool is not int8: any tensor will do.
    ks = k_scale if k_scale is not None else start_pos
    vs = v_scale if v_scale is not None else start_pos
    ks_strides = k_scale.stride() if k_scale is not None else (0, 0)
    vs_strides = v_scale.stride() if v_scale is not None else (0, 0)

    if tiles is not None:
        grid: tuple[int, ...] = (tiles.shape[1], num_heads)
    else:
        grid = (triton.cdiv(max_new_len, block_m), num_seqs, num_heads)
    _prefill_kernel[grid](
        q,
        k_pool,
        v_pool,
        ks,
        vs,
        req_to_token,
        req_indices,
        start_pos,
        cu_new_lens,
        out,
        tiles if tiles is not None else cu_new_lens,
        tiles.stride(0) if tiles is not None else 0,
        scale * _LOG2E,
        sliding_window or 0,
        *q.stride(),
        *k_pool.stride(),
        *v_pool.stride(),
        *ks_strides,
        *vs_strides,
        *req_to_token.stride(),
        *out.stride(),
        alibi_slopes if alibi_slopes is not None else start_pos,  # unused without ALiBi
        GROUP=num_heads // k_pool.shape[1],
        HEAD_DIM=head_dim,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HAS_WINDOW=sliding_window is not None,
        IS_INT8=is_int8,
        DOT_PRECISION=dot_precision(q.dtype),
        USE_TILES=tiles is not None,
        HAS_ALIBI=alibi_slopes is not None,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
