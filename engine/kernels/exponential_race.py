"""The sampler's exponential race in one pass: row i's token is
argmax_j (logits[i, j] / temps[i] - log E[i, j]), E[i, j] ~ Exp(1) from the SplitMix64 stream
of seeds[i] (`engine.worker.race.exponential_noise`, computed here per block instead of stored).

That is `argmax(softmax(logits / t) / E)`, the torch path of `Sampler`, without its [rows,
vocab] int64 and float32 intermediates: the logits are read once. Entries below a row's
threshold (`thresholds`, what top-k, top-p and min-p keep: `keep_thresholds`), and -inf
ones, never win. Ties go to the lowest id, as torch's argmax does; the two paths round
differently, so a near-tie may go the other way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["exponential_race"]

_BLOCK = 1024


@triton.jit
def _race_kernel(logits_ptr, stride, temps_ptr, seeds_ptr, thresholds_ptr, out_ptr, vocab,
                 HAS_THRESHOLDS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    temp = tl.load(temps_ptr + row)
    if HAS_THRESHOLDS:
        threshold = tl.load(thresholds_ptr + row)
    seed = tl.load(seeds_ptr + row).to(tl.uint64)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK], tl.int64)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK).to(tl.int64)
        logit = tl.load(logits_ptr + row * stride + cols, mask=cols < vocab, other=float("-inf"))
        # SplitMix64 of (seed + (col + 1) * golden), as exponential_noise: uint64 wraps
        x = seed + (cols + 1).to(tl.uint64) * 0x9E3779B97F4A7C15
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB
        x = x ^ (x >> 31)
        uniform = ((x >> 41).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 23 bits -> (0, 1), unit_interval
        x = tl.math.div_rn(logit.to(tl.float32), temp)  # IEEE division, as torch's and keep_thresholds'
        score = x - tl.log(-tl.log(uniform))
        if HAS_THRESHOLDS:
            score = tl.where(x >= threshold, score, float("-inf"))
        better = score > best  # strict: a lane keeps its lowest id among equals
        best = tl.where(better, score, best)
        best_idx = tl.where(better, cols, best_idx)
    top = tl.max(best, axis=0)
    tl.store(out_ptr + row, tl.min(tl.where(best == top, best_idx, vocab), axis=0))


def exponential_race(
    logits: torch.Tensor, temps: torch.Tensor, seeds: torch.Tensor, thresholds: torch.Tensor | None = None
) -> torch.Tensor:
    """logits [rows, vocab] (float32, -inf where masked), temps [rows] float32 (> 0), seeds
    [rows] int64, thresholds [rows] float32 (a row draws among the tokens whose logits / temps
    are at least its threshold; None: all) -> the drawn token ids [rows] int64."""
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.stride(-1) != 1:
        raise ValueError(f"logits must be float32 [rows, vocab] with a contiguous last dim, got {logits.dtype} "
                         f"{list(logits.shape)} strides {logits.stride()}")
    rows, vocab = logits.shape
    if temps.shape != (rows,) or seeds.shape != (rows,):
        raise ValueError(f"temps and seeds must have shape [{rows}], got {list(temps.shape)} and {list(seeds.shape)}")
    if thresholds is not None and thresholds.shape != (rows,):
        raise ValueError(f"thresholds must have shape [{rows}], got {list(thresholds.shape)}")
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows and vocab:
        temps = temps.to(torch.float32)
        _race_kernel[(rows,)](
            logits, logits.stride(0), temps, seeds.to(torch.int64),
            temps if thresholds is None else thresholds.to(torch.float32), out, vocab,
            HAS_THRESHOLDS=thresholds is not None, BLOCK=_BLOCK,
        )
    return out
