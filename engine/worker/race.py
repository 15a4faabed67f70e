"""The exponential race in torch: counter-based Exp(1) noise and the race over it.

Sampling is an exponential race: `argmax(probs / E)` with `E ~ Exp(1)` per vocab entry picks
token i with probability `probs[i] / sum(probs)`. Row i's `E` is the SplitMix64 stream of one
63-bit seed (`step_seed` for a seeded request, so its tokens depend on neither the batch nor
preemption), computed from the seed and the column, never stored: CPU and CUDA give the same
numbers. This is what the sampler runs without the Triton backend, and the reference of the
fused kernel (engine/kernels/exponential_race.py).
"""

from __future__ import annotations

import torch

from engine.worker.transfer import to_device

# On the CPU the race draws its noise about this many entries ([rows, columns]) at a time
# (see `race`): 512 KB of int64, which stays in the cache.
_RACE_PIECE = 65536

_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64 finalizer: a well-spread 64-bit hash of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_seed(seed: int, num_generated: int) -> int:
    """The generator seed of a seeded row's draw for its `num_generated`-th output token."""
    return _mix64(_mix64(seed & _MASK64) ^ num_generated) >> 1  # 63 bits: valid everywhere


def _srl(x: torch.Tensor, shift: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> shift) & ((1 << (64 - shift)) - 1)


def _int64(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def exponential_noise(seeds: list[int], vocab_size: int, device: torch.device) -> torch.Tensor:
    """Exp(1) noise [len(seeds), vocab]: row i is the SplitMix64 stream of seeds[i].

    Counter-based, so a row depends on its seed alone (not on the batch), all rows come from
    one batched computation, and CPU and CUDA give the same numbers. int64 products wrap.
    """
    return _noise_columns(to_device(seeds, torch.int64, device).unsqueeze(1), 0, vocab_size)


def _noise_columns(seed: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Columns [start, stop) of `exponential_noise` for the seeds [n, 1] (int64)."""
    return _noise(seed, torch.arange(start + 1, stop + 1, dtype=torch.int64, device=seed.device))


def _noise(seed: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """Exp(1) noise of the SplitMix64 streams `seed` at `counter` (column + 1), broadcast."""
    x = seed + counter * _int64(0x9E3779B97F4A7C15)
    x ^= _srl(x, 30)
    x *= _int64(0xBF58476D1CE4E5B9)
    x ^= _srl(x, 27)
    x *= _int64(0x94D049BB133111EB)
    x ^= _srl(x, 31)
    return unit_interval(x).log_().neg_()


def race(probs: torch.Tensor, seeds: list[int], kept: torch.Tensor | None = None) -> torch.Tensor:
    """The exponential race: argmax(probs / `exponential_noise`) per row, ties to the lowest id.

    `kept` ([rows, vocab] bool, where top-k / top-p / min-p leave probs > 0): on the CPU, when
    it holds few entries, only those draw noise (the others, 0 / noise, cannot win).

    On the CPU, when the rows are many, a few thousand columns at a time, so that each piece's
    int64 noise stays in the cache through its dozen passes (faster than the whole at once, with
    the same tokens: docs/benchmarks.md, "CPU: top-k and top-p without sorting the vocabulary";
    one row fits whole); elsewhere in one go, as each piece would be a dozen more launches."""
    rows, vocab_size = probs.shape
    seed = to_device(seeds, torch.int64, probs.device).unsqueeze(1)
    if kept is not None and probs.device.type == "cpu":
        row_ids, col_ids = kept.nonzero(as_tuple=True)  # row-major: by row, then by id
        if 8 * row_ids.numel() < rows * vocab_size:
            score = probs[row_ids, col_ids] / _noise(seed.squeeze(1)[row_ids], col_ids + 1)
            best = torch.full((rows,), float("-inf"), dtype=score.dtype).scatter_reduce(0, row_ids, score, "amax")
            at_best = score == best[row_ids]
            first = torch.full((rows,), vocab_size, dtype=torch.int64)
            first = first.scatter_reduce(0, row_ids[at_best], col_ids[at_best], "amin")  # the lowest id of a tie
            # a row of NaN (an inf logit) has no best: 0, as argmax over the whole row gives
            return first.masked_fill_(first == vocab_size, 0)
    columns = max(1024, _RACE_PIECE // max(rows, 1))
    if probs.device.type != "cpu" or vocab_size <= columns:
        return (probs / _noise_columns(seed, 0, vocab_size)).argmax(dim=-1)
    best = torch.full((rows,), -1.0, dtype=probs.dtype)
    best_id = torch.zeros(rows, dtype=torch.int64)
    for start in range(0, vocab_size, columns):
        stop = min(vocab_size, start + columns)
        value, index = (probs[:, start:stop] / _noise_columns(seed, start, stop)).max(dim=-1)
        better = value > best  # strictly: an equal score further on does not win, as with argmax
        best = torch.where(better, value, best)
        best_id = torch.where(better, index + start, best_id)
    return best_id


def unit_interval(x: torch.Tensor) -> torch.Tensor:
    """int64 random bits -> float32 uniforms in (0, 1): the top 23 bits, plus a half.

    23 and not 24: (2**24 - 1 + 0.5) rounds to 2**24 in float32, so one draw in 2**24 would be
    exactly 1, its Exp(1) noise 0 and its token the winner whatever its probability (a masked
    one too): with a 128 k vocabulary, one row in ~130 at every step."""
    return (_srl(x, 41).float() + 0.5) * 2.0**-23
