"""Each row's smallest kept tempered logit under its top-k, top-p and min-p, without a sort.

Row i keeps the tokens whose `logits[i] / temps[i]` is at least `thresholds[i]`
(`engine.worker.sampler.keep_thresholds` is the torch version, the reference: a sort of the whole
vocabulary). Keeping a token depends only on what lies above it, so each filter keeps every
token at or above some value, found here by searching the float values' order instead of
sorting them:

- a float32 maps to an int32 key of the same order (`_key`), so "the smallest kept value"
  is "the smallest key T such that what lies strictly above T fits": fewer than k tokens
  (top-k), a probability mass of at most p (top-p, in the distribution left by top-k);
- each pass over the row counts (or sums) what lies above 8 keys spread over the interval
  that holds T, which narrows it 8-fold: at most 11 passes per filter for 32-bit keys;
- min-p needs only the row's maximum: p >= min_p * p_max is x >= x_max + log(min_p).

So a token tied with the smallest kept value stays in, as with `top_k` in the torch path.
One program per row; the row is read 2 + 11 * (number of filters) times at most.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["keep_thresholds"]

_BLOCK = 256
# Keys tried per pass: more ways, fewer passes but more work per element, and the search is
# bound by that work, not by reading the logits. 8 was the fastest of 4, 8, 16 and 32 on an
# H200 (scripts/sampler_bench.py --ways; docs/benchmarks.md, run of 2026-12-02 07:25).
_WAYS = 8
_KEY_NEG_INF = -2139095041  # _key(-inf): below every other value's key


@triton.jit
def _key(x):
    """float32 -> int32 of the same order (+0.0 for -0.0: x + 0.0)."""
    bits = (x + 0.0).to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip the magnitude bits


@triton.jit
def _value(key):
    """The inverse of `_key` (an int64 holding an int32 key) -> float32."""
    k = key.to(tl.int32)
    return (k ^ ((k >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _above(row_ptr, vocab, temp, x_max, points, MASS: tl.constexpr, BLOCK: tl.constexpr):
    """For each key of `points`: how many tokens (or, MASS, how much of exp(x - x_max)) lie
    strictly above it."""
    total = tl.zeros(points.shape, tl.float32)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        x = tl.math.div_rn(x, temp)  # IEEE division, as torch's: the same values as the race's
        above = _key(x)[:, None] > points[None, :]  # padding (-inf) is above no point
        if MASS:
            weight = tl.exp(x - x_max)  # x_max is finite here
        else:
            weight = tl.full([BLOCK], 1.0, tl.float32)
        total += tl.sum(tl.where(above, weight[:, None], 0.0), axis=0)
    return total


@triton.jit
def _smallest_fitting(row_ptr, vocab, temp, x_max, lo, hi, limit, MASS: tl.constexpr, BLOCK: tl.constexpr,
                      WAYS: tl.constexpr):
    """The smallest key T in [lo, hi] with `_above(T) <= limit`, given that hi qualifies and
    that what lies above a key only shrinks as the key grows."""
    ways = tl.arange(0, WAYS).to(tl.int64)
    while lo < hi:
        points = lo + ((hi - lo) * ways) // WAYS  # lo first, all below hi
        fits = _above(row_ptr, vocab, temp, x_max, points.to(tl.int32), MASS, BLOCK) <= limit  # keys: int32
        hi = tl.min(tl.where(fits, points, hi), axis=0)
        lo = tl.max(tl.where(fits, lo, points + 1), axis=0)
    return lo


@triton.jit
def _keep_thresholds_kernel(logits_ptr, stride, temps_ptr, top_k_ptr, top_p_ptr, min_p_ptr, out_ptr, vocab,
                            BLOCK: tl.constexpr, WAYS: tl.constexpr, KEY_NEG_INF: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride
    temp = tl.load(temps_ptr + row)
    top_k = tl.load(top_k_ptr + row)
    top_p = tl.load(top_p_ptr + row)
    min_p = tl.load(min_p_ptr + row)

    # the row's maximum and sum of exp(x - max), online; -inf entries add nothing
    run_max = tl.full([BLOCK], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK], tl.float32)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        x = tl.math.div_rn(x, temp)  # IEEE division, as torch's: the same values as the race's
        run_max_new = tl.maximum(run_max, x)
        shift = tl.where(run_max_new == float("-inf"), 0.0, run_max_new)  # no -inf - -inf
        run_sum = run_sum * tl.exp(run_max - shift) + tl.exp(x - shift)
        run_max = run_max_new
    x_max = tl.max(run_max, axis=0)
    total = tl.sum(run_sum * tl.exp(run_max - tl.where(x_max == float("-inf"), 0.0, x_max)), axis=0)

    lo = tl.full([], KEY_NEG_INF, tl.int64)  # -inf: every token kept
    hi = _key(x_max).to(tl.int64)  # nothing lies above the maximum
    threshold = tl.full([], float("-inf"), tl.float32)
    if x_max > float("-inf"):
        if (top_k > 0) & (top_k < vocab):  # fewer than k tokens above the smallest kept
            lo = _smallest_fitting(row_ptr, vocab, temp, x_max, lo, hi, (top_k - 1).to(tl.float32), False,
                                   BLOCK, WAYS)
            threshold = _value(lo)
            # top-p renormalises over what top-k keeps
            at_least = (tl.full([WAYS], 1, tl.int64) * (lo - 1)).to(tl.int32)  # the same point WAYS times
            total = tl.max(_above(row_ptr, vocab, temp, x_max, at_least, True, BLOCK), axis=0)
        if top_p < 1.0:  # at most a mass of p above the smallest kept
            lo = _smallest_fitting(row_ptr, vocab, temp, x_max, lo, hi, top_p * total, True, BLOCK, WAYS)
            threshold = _value(lo)
        if min_p > 0.0:
            threshold = tl.maximum(threshold, x_max + tl.log(min_p))
    tl.store(out_ptr + row, threshold)


def keep_thresholds(
    logits: torch.Tensor, temps: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor, min_ps: torch.Tensor
) -> torch.Tensor:
    """logits [rows, vocab] (float32, -inf where masked), per row: temps (> 0), top_ks (int32;
    0 or >= vocab: off), top_ps (1.0: off), min_ps (0.0: off) -> [rows] float32, the smallest
    value of logits / temps that each row keeps (-inf: all)."""
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.stride(-1) != 1:
        raise ValueError(f"logits must be float32 [rows, vocab] with a contiguous last dim, got {logits.dtype} "
                         f"{list(logits.shape)} strides {logits.stride()}")
    rows, vocab = logits.shape
    for name, t in (("temps", temps), ("top_ks", top_ks), ("top_ps", top_ps), ("min_ps", min_ps)):
        if t.shape != (rows,):
            raise ValueError(f"{name} must have shape [{rows}], got {list(t.shape)}")
    out = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows and vocab:
        _keep_thresholds_kernel[(rows,)](
            logits, logits.stride(0), temps.to(torch.float32), top_ks.to(torch.int32), top_ps.to(torch.float32),
            min_ps.to(torch.float32), out, vocab, BLOCK=_BLOCK, WAYS=_WAYS, KEY_NEG_INF=_KEY_NEG_INF,
        )
    return out
