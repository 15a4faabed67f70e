"""Products of a few token rows with a weight matrix on the CUDA cores: decode steps' linear layers.

    y[m, n] = sum_k x[m, k] * W[n, k]  (+ bias[n])           x: [M, K], W: [N, K], M <= MAX_ROWS

At one to eight rows a linear layer is a read of its weights; the tensor cores have nothing to
do, and a GEMM tiled for them (16+ rows per tile) wastes most of what it loads. Here every
program reads a [BLOCK_N, BLOCK_K] tile of W per iteration, multiplies it with the rows of x
broadcast over it, and adds the fp32 products to a [BLOCK_M, BLOCK_N, BLOCK_K / VEC] accumulator
that is summed across threads once, at the end (no cross-thread reduction inside the loop).

The grid splits both N and K: (ceil(N / BLOCK_N), SPLIT_K). With SPLIT_K == 1 a program writes its
outputs directly. Otherwise each split writes fp32 partial sums to a [SPLIT_K, M, N] buffer, and
the partials are added in split order and the rows finished (scales, bias, rounding) either by a
second, tiny launch, or (`GemvLaunch.last_finishes`) by whichever split of a column block arrives
last, counted with an atomic per block: one launch, no gap between two. Either way the order of
the sums is fixed, so a step gives the same bits every run (atomic adds of the partials into the
output would sum in arrival order and could flip a greedy token between runs).

Two weight formats, one kernel:

- bf16 / fp16 / fp32 weights in the activations' dtype: fp32 products and sums, + bias, rounded
  once to the activations' dtype (as `F.linear`).
- FP8 e4m3 weights with a float32 scale per output row (`engine.layers.fp8`): each program finds
  the activation rows' scales from their whole rows (small and L2-resident), quantizes its K range
  of them exactly as `engine.kernels.fp8_quant` / `quantize_fp8_rows` do (scale = max(amax / 448,
  1e-12), q = e4m3(clamp(x / scale, +-448)) rounded to nearest even), multiplies codes by codes in
  fp32 (exact: 4-bit by 4-bit significands), then y = round(sum * s_x * s_w), + bias rounded
  again: the quantize + `torch._scaled_mm` path of `fp8_linear` up to the order of the fp32 sums.

The e4m3 rounding is done with float32 arithmetic and integer ops (`_round_to_e4m3`), which give
torch's codes bit for bit on the GPU and under the CPU interpreter alike (the interpreter's own
float32 -> e4m3 cast rounds some values wrongly).

Both tiles are loaded through 3-D pointers ([BLOCK_M, 1, BLOCK_K] and [1, BLOCK_N, BLOCK_K]) so
that the loads' vectorized layout is the accumulator's: built from 2-D tiles and broadcast, the
weights went through shared memory every iteration (seen in the compiled TTGIR). Each thread
sums its VEC contiguous products before adding them to the accumulator (a reshape that moves no
data), so the accumulator takes BLOCK_M * BLOCK_N registers a thread, not VEC times that. The
launch (BLOCK_N, BLOCK_K, SPLIT_K, num_warps) comes from `launch_for`: a table of measured
settings by (weight kind, row bucket, N bucket, K bucket) (`scripts/fp8_linear_bench.py --sweep`
prints its entries), else a rule that keeps the accumulator in registers and gives every SM
several programs. No host synchronisation and no allocation outside torch's caching allocator:
the launches are captured in CUDA graphs as they are.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from engine.kernels._rounding import round_to

__all__ = ["MAX_ROWS", "GemvLaunch", "default_launch", "fp8_gemv", "gemv", "launch_for"]

MAX_ROWS = 8  # rows of x one launch takes (the accumulator holds all of them)
# As engine.layers.fp8 / engine.kernels.fp8_quant: e4m3's largest value; an all-zero row's scale.
_FP8_MAX = tl.constexpr(448.0)
_MIN_SCALE = tl.constexpr(1e-12)
_REDUCE_BLOCK_N = 128
# SMs assumed when the tensors are not on a GPU (the CPU interpreter): an H100's, so that tests
# there take the split-K paths the GPU takes.
_NOMINAL_SMS = 132


@triton.jit
def _round_to_e4m3(v):
    """float32 v with |v| <= 448 -> the nearest e4m3 value (ties to even), as float32: what
    torch's cast to float8_e4m3fn gives, bit for bit."""
    a = tl.abs(v)
    # Normal range (>= 2^-6): keep 3 of float32's 23 fraction bits, rounding half to even; a carry
    # into the exponent is the correct rounding up.
    bits = a.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
    # Subnormal range: multiples of 2^-9. Adding 1.5 * 2^23 rounds to an integer (to even) in
    # float32 for 0 <= a * 512 < 2^22; subtracting it back is exact.
    sub = ((a * 512.0 + 12582912.0) - 12582912.0) * 0.001953125
    r = tl.where(a < 0.015625, sub, normal)
    return tl.where(v < 0, -r, r)


@triton.jit
def _row_scales(x_ptr, M, K, stride_xm, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per-row FP8 scales of x's first M rows: max(amax / 448, 1e-12), [BLOCK_M] float32."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    amax = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask = (offs_m[:, None] < M) & (k0 + offs_k[None, :] < K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k0 + offs_k[None, :], mask=mask, other=0.0)
        amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
    return tl.maximum(tl.math.div_rn(tl.max(amax, axis=1), _FP8_MAX), _MIN_SCALE)


@triton.jit
def _finish_rows(
    acc, x_scale, offs_m, offs_n, M, N, out_ptr, stride_om, w_scale_ptr, bias_ptr,
    FP8: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """acc [BLOCK_M, BLOCK_N] fp32 sums -> scales, bias and rounding as the torch paths, stored."""
    mask_n = offs_n < N
    if FP8:
        # _scaled_mm's row-wise scaling rounds to the output dtype; fp8_linear adds the bias after.
        w_scale = tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0)
        y = round_to(acc * x_scale[:, None] * w_scale[None, :], out_ptr.dtype.element_ty)
        if HAS_BIAS:
            b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            y = round_to(y.to(tl.float32) + b[None, :], out_ptr.dtype.element_ty)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        y = round_to(acc, out_ptr.dtype.element_ty)
    mask = (offs_m[:, None] < M) & mask_n[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], y, mask=mask)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, out_ptr, partial_ptr, x_scale_ptr, w_scale_ptr, bias_ptr, counter_ptr,
    M, N, K, k_per_split, stride_xm, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    SPLIT: tl.constexpr, LAST_FINISHES: tl.constexpr, FP8: tl.constexpr, HAS_BIAS: tl.constexpr, VEC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if FP8:
        x_scale = _row_scales(x_ptr, M, K, stride_xm, BLOCK_M, BLOCK_K)  # [BLOCK_M]
    else:
        x_scale = tl.zeros([BLOCK_M], dtype=tl.float32)  # unused
    # 3-D pointers for both tiles, so that the loads' own (vectorized) layout is the product's:
    # x [BLOCK_M, 1, BLOCK_K] and W [1, BLOCK_N, BLOCK_K] broadcast to the accumulator's shape.
    x_rows = x_ptr + offs_m[:, None, None] * stride_xm  # [BLOCK_M, 1, 1]
    w_rows = w_ptr + offs_n[None, :, None].to(tl.int64) * stride_wn  # [1, BLOCK_N, 1]
    x_mask = mask_m[:, None, None]
    w_mask = mask_n[None, :, None]
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        # At most VEC contiguous inputs a thread: FP8 weights then take the 16-bit activations'
        # layout (8-byte loads) instead of a shuffle of the activations through shared memory.
        ks = tl.max_contiguous(k0 + offs_k, VEC)[None, None, :]  # [1, 1, BLOCK_K]
        if EVEN_K:  # no mask along K: the loads stay vectorized
            x = tl.load(x_rows + ks, mask=x_mask, other=0.0)
            w = tl.load(w_rows + ks, mask=w_mask, other=0.0)
        else:
            x = tl.load(x_rows + ks, mask=x_mask & (ks < k_end), other=0.0)
            w = tl.load(w_rows + ks, mask=w_mask & (ks < k_end), other=0.0)
        xf = x.to(tl.float32)  # [BLOCK_M, 1, BLOCK_K]
        if FP8:
            xf = _round_to_e4m3(tl.clamp(tl.math.div_rn(xf, x_scale[:, None, None]), -_FP8_MAX, _FP8_MAX))
        prod = xf * w.to(tl.float32)  # [BLOCK_M, BLOCK_N, BLOCK_K]
        acc += tl.sum(tl.reshape(prod, [BLOCK_M, BLOCK_N, BLOCK_K // VEC, VEC]), axis=3)
    sums = tl.sum(acc, axis=2)  # [BLOCK_M, BLOCK_N]
    if SPLIT:
        part = partial_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
        tl.store(part, sums, mask=mask_m[:, None] & mask_n[None, :])
        if LAST_FINISHES:
            # The split that arrives last adds all of them, in split order. bar.sync: every thread's
            # partial stored; the acq_rel atomic publishes them (release) and, for the last one,
            # makes the others' visible (acquire); the last one resets the counter for the next launch.
            tl.debug_barrier()
            arrived = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
            if arrived == tl.num_programs(1) - 1:
                acc2 = _sum_splits(partial_ptr, offs_m, offs_n, M, N, tl.num_programs(1), BLOCK_M, BLOCK_N)
                _finish_rows(acc2, x_scale, offs_m, offs_n, M, N, out_ptr, stride_om, w_scale_ptr, bias_ptr, FP8,
                             HAS_BIAS)
                tl.store(counter_ptr + pid_n, 0)
        elif FP8:
            if (pid_n == 0) & (pid_k == 0):  # every program found the same scales
                tl.store(x_scale_ptr + offs_m, x_scale, mask=mask_m)
    else:
        _finish_rows(sums, x_scale, offs_m, offs_n, M, N, out_ptr, stride_om, w_scale_ptr, bias_ptr, FP8, HAS_BIAS)


@triton.jit
def _sum_splits(partial_ptr, offs_m, offs_n, M, N, num_splits, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_M, BLOCK_N] sums of the fp32 partials [num_splits, M, N], in split order (the same
    sum every run); loaded past L1, which may not hold other SMs' writes."""
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    part = partial_ptr + offs_m[:, None] * N + offs_n[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for s in range(0, num_splits):
        acc += tl.load(part + s * M * N, mask=mask, other=0.0, cache_modifier=".cg")
    return acc


@triton.jit
def _reduce_kernel(
    partial_ptr, out_ptr, x_scale_ptr, w_scale_ptr, bias_ptr, M, N, num_splits, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP8: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _sum_splits(partial_ptr, offs_m, offs_n, M, N, num_splits, BLOCK_M, BLOCK_N)
    if FP8:
        x_scale = tl.load(x_scale_ptr + offs_m, mask=offs_m < M, other=1.0)
    else:
        x_scale = tl.zeros([BLOCK_M], dtype=tl.float32)  # unused
    _finish_rows(acc, x_scale, offs_m, offs_n, M, N, out_ptr, stride_om, w_scale_ptr, bias_ptr, FP8, HAS_BIAS)


@dataclass(frozen=True, slots=True)
class GemvLaunch:
    """One launch configuration: weight rows and inputs per tile, K splits, warps, and where the
    splits are added. (No num_stages: Triton does not pipeline these loads, whose uses are no
    `tl.dot`; the compiled code is the same for any.)"""

    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    # With split K: the split that finishes last adds the partial sums (one launch, a counter per
    # column block), instead of a second launch.
    last_finishes: bool = False


# Measured on an H100 with `scripts/fp8_linear_bench.py --sweep`, which prints these entries:
# (weight kind "fp8" | "bf16" (any 16-bit or fp32 weight), row bucket, N bucket, K bucket), where
# a bucket is the next power of two. Shapes not listed take `default_launch`.
_TUNED: dict[tuple[str, int, int, int], GemvLaunch] = {}

_ROW_BUCKETS = (1, 2, 4, 8)


def table_key(kind: str, m: int, n: int, k: int) -> tuple[str, int, int, int]:
    """The `_TUNED` key of a product of m rows with an [n, k] weight of `kind` ("fp8" or "bf16")."""
    return (kind, triton.next_power_of_2(m), triton.next_power_of_2(n), triton.next_power_of_2(k))


@functools.cache  # a pure function of the shape, asked for on every eager call
def default_launch(m: int, n: int, k: int, fp8: bool, num_sms: int = _NOMINAL_SMS) -> GemvLaunch:
    """A launch for shapes without a measured one. A tile row spans every thread with 8
    contiguous inputs each (16-byte loads of 16-bit weights, 8-byte ones of FP8): the activations'
    own loads then land in the weights' layout, with no shuffle through shared memory in the loop.
    16 weight rows per tile at one token row, fewer as rows grow (the activations' registers grow
    with them); 4 warps, 8 at 8 rows; K split into equal splits of two or more tiles until every SM
    has about four programs, the last split to arrive adding them up."""
    block_m = triton.next_power_of_2(m)
    num_warps = 4 if block_m <= 4 else 8
    block_k = 8 * 32 * num_warps
    while block_k > 64 and block_k >= 2 * triton.next_power_of_2(k):  # short rows: smaller tiles
        block_k //= 2
    block_n = max(2, 16 // block_m)
    n_blocks = triton.cdiv(n, block_n)
    tiles = triton.cdiv(k, block_k)
    # Splits of equal whole tiles (a short last split leaves its SMs idle), at least two each.
    splits = [d for d in range(1, tiles // 2 + 1) if tiles % d == 0] or [1]
    split_k = next((d for d in splits if n_blocks * d >= 4 * num_sms), splits[-1])
    return GemvLaunch(block_n, block_k, split_k, num_warps, last_finishes=split_k > 1)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return _NOMINAL_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def launch_for(m: int, n: int, k: int, fp8: bool, device: torch.device) -> GemvLaunch:
    """The measured launch for this shape's buckets (or a larger row bucket's), else the default."""
    kind = "fp8" if fp8 else "bf16"
    _, rows, n_bucket, k_bucket = table_key(kind, m, n, k)
    for bucket in _ROW_BUCKETS:
        if bucket >= rows and (kind, bucket, n_bucket, k_bucket) in _TUNED:
            return _TUNED[(kind, bucket, n_bucket, k_bucket)]
    return default_launch(m, n, k, fp8, _num_sms(device))


def vec_of(cfg: GemvLaunch) -> int:
    """Contiguous inputs a thread holds along K when a tile row spans its threads (at most 8, as
    the layout of a 16-byte load of 16-bit activations has)."""
    return max(1, min(8, cfg.block_k // (32 * cfg.num_warps)))


class SplitPlan(NamedTuple):
    k_per_split: int  # inputs per split: whole BLOCK_K tiles
    num_splits: int  # fewer than asked when K is short
    block_m: int  # rows of x padded to a power of two
    even_k: bool  # every split is whole tiles: no mask along K


def split_plan(m: int, k: int, cfg: GemvLaunch) -> SplitPlan:
    """How a launch covers K (also what `scripts/gemv_sass.py` specializes the kernel by)."""
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    return SplitPlan(k_per_split, triton.cdiv(k, k_per_split), triton.next_power_of_2(m), k % k_per_split == 0)


_MAX_COLUMN_BLOCKS = 1 << 16  # arrival counters per stream (256 KiB)


def _arrival_counters(device: torch.device) -> torch.Tensor:
    """Zeroed int32 counters for `last_finishes` launches on the current stream. Launches on one
    stream run one after another, and each leaves its counters at zero again; another stream (a
    CUDA graph's capture stream) gets its own."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    return _counters_of(device, stream)


@functools.cache
def _counters_of(device: torch.device, stream: int) -> torch.Tensor:
    return torch.zeros(_MAX_COLUMN_BLOCKS, dtype=torch.int32, device=device)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    assert x.dim() == 2 and x.stride(-1) == 1, "x: [M, K], each row contiguous"
    assert x.shape[0] <= MAX_ROWS, f"at most {MAX_ROWS} rows"
    assert x.dtype in (torch.bfloat16, torch.float16, torch.float32), "x: a float dtype"
    assert weight.dim() == 2 and weight.stride(-1) == 1, "weight: [N, K], each row contiguous"
    assert weight.shape[1] == x.shape[1], "x and weight disagree on K"
    assert weight.device == x.device, "x and weight on one device"
    if bias is not None:
        assert bias.shape == (weight.shape[0],) and bias.stride(0) == 1, "bias: [N]"


def _launch(
    x: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor | None, bias: torch.Tensor | None,
    launch: GemvLaunch | None,
) -> torch.Tensor:
    m, k = x.shape
    n = weight.shape[0]
    fp8 = w_scale is not None
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    cfg = launch or launch_for(m, n, k, fp8, x.device)
    k_per_split, num_splits, block_m, even_k = split_plan(m, k, cfg)
    split = num_splits > 1
    n_blocks = triton.cdiv(n, cfg.block_n)
    last_finishes = split and cfg.last_finishes and n_blocks <= _MAX_COLUMN_BLOCKS
    second_launch = split and not last_finishes
    partial = torch.empty((num_splits, m, n), dtype=torch.float32, device=x.device) if split else out
    x_scale = torch.empty((m,), dtype=torch.float32, device=x.device) if second_launch and fp8 else out
    counters = _arrival_counters(x.device) if last_finishes else out
    w_scale_arg = w_scale if w_scale is not None else out  # never read without FP8
    bias_arg = bias if bias is not None else out  # never read without HAS_BIAS
    _gemv_kernel[(n_blocks, num_splits)](
        x, weight, out, partial, x_scale, w_scale_arg, bias_arg, counters,
        m, n, k, k_per_split, x.stride(0), weight.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=even_k, SPLIT=split,
        LAST_FINISHES=last_finishes, FP8=fp8, HAS_BIAS=bias is not None, VEC=vec_of(cfg), num_warps=cfg.num_warps,
    )
    if second_launch:
        _reduce_kernel[(triton.cdiv(n, _REDUCE_BLOCK_N),)](
            partial, out, x_scale, w_scale_arg, bias_arg, m, n, num_splits, out.stride(0),
            BLOCK_M=block_m, BLOCK_N=_REDUCE_BLOCK_N, FP8=fp8, HAS_BIAS=bias is not None, num_warps=4,
        )
    return out


def gemv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, launch: GemvLaunch | None = None
) -> torch.Tensor:
    """x [M, K] @ weight [N, K].T (+ bias [N]) -> [M, N] in x's dtype; weight in x's dtype,
    M <= MAX_ROWS; `launch` overrides the table (benchmarks)."""
    _check(x, weight, bias)
    assert weight.dtype == x.dtype, "weight in the activations' dtype"
    return _launch(x, weight, None, bias, launch)


def fp8_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    launch: GemvLaunch | None = None,
) -> torch.Tensor:
    """`fp8_linear` for M <= MAX_ROWS rows in one launch (two with split K): x [M, K] bf16 / fp16 /
    fp32, weight [N, K] float8_e4m3fn, weight_scale [N, 1] float32 -> [M, N] in x's dtype."""
    _check(x, weight, bias)
    assert weight.dtype == torch.float8_e4m3fn, "weight: float8_e4m3fn"
    assert weight_scale.dtype == torch.float32 and weight_scale.numel() == weight.shape[0], "scale per row"
    assert weight_scale.is_contiguous(), "weight_scale contiguous"
    return _launch(x, weight, weight_scale, bias, launch)
