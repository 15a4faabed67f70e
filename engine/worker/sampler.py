"""Batched sampling over one step's logits, in the worker process.

Each running row owns a `SamplingState` (engine/worker/sampling_state.py: its params and what
penalties need, the penalized rows' counts in the sampler's one `PenaltyTable`). A step hands
the sampler `logits [num_rows, vocab]` and the rows' states, in the same order:

    logits ─► logit_bias ─► min_tokens (mask stop ids) ─► repetition penalty
           ─► presence / frequency penalties ─► grammar mask (constrained rows)
           ─► greedy rows: argmax
              other rows: temperature ─► top_k ─► top_p ─► min_p ─► exponential race

The grammar mask (`StepMask`, engine/worker/grammar_masks.py) sets -inf wherever a
constrained row's grammar does not allow the token; -inf never wins the race or the argmax.

top_k, top_p and min_p each keep every token at or above some value, so together they come
to one threshold per row (`keep_thresholds`), below which the race does not look.

Sampling is an exponential race (engine/worker/race.py): `argmax(probs / E)` with `E ~ Exp(1)`
per vocab entry picks token i with probability `probs[i] / sum(probs)`. Each row's `E` is a
counter-based stream of one 63-bit seed: for a seeded request a hash of (seed, number of
tokens generated so far), so its tokens do not depend on the batch it shares or on
preemption; for the others a draw from the sampler's own random source. Logprobs describe
the raw distribution (log_softmax of the logits before any processing), one `TokenLogprobs`
(engine/messages.py, the type the engine core receives) per row that asked. Everything is
plain torch, so CPU and CUDA behave alike; with the Triton backend the race is one Triton
kernel (`FUSED_RACE`), and with many rows the thresholds another, which neither sorts nor
copies the logits: the same draws up to rounding.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.grammar.bitmask import apply_token_bitmask
from engine.layers.backend import use_triton
from engine.messages import TokenLogprobs
from engine.worker.race import race, step_seed
from engine.worker.sampling_state import PenaltyTable, SamplingState, apply_penalties, column
from engine.worker.transfer import HostCopy, to_device

if TYPE_CHECKING:
    from engine.worker.grammar_masks import StepMask

# On a GPU with the Triton backend, draw sampled tokens with one fused kernel
# (engine/kernels/exponential_race.py) instead of the torch ops below: same draws up to
# rounding in near-ties, and several times faster at large batches (scripts/sampler_bench.py
# --fused; docs/benchmarks.md, run of 2026-12-02 06:50).
FUSED_RACE = True
# With it, from this many rows top-k / top-p thresholds come from the search kernel
# (engine/kernels/keep_thresholds.py), below it from torch's sort. The search runs one program
# per row, which leaves most of the GPU idle when there are few rows: below this many it lost
# to the sort (docs/benchmarks.md, "GPU: served", run of 2026-12-02 07:25).
SEARCH_MIN_ROWS = 256
# On the CPU, top-p looks at this many of a row's largest values before sorting it whole (see
# keep_thresholds): a `topk` of this size costs a small part of a whole row's sort
# (docs/benchmarks.md, "Figures behind choices in the code").
NUCLEUS_GUESS = 256


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]  # one per row
    sampled: torch.Tensor  # [num_rows] int64, on the logits' device (next step's input ids)
    logprobs: list[TokenLogprobs | None] | None = None  # None for rows that asked for none


def _apply_bias_and_min_tokens(logits: torch.Tensor, states: list[SamplingState]) -> None:
    """Add each row's logit_bias, and -inf to its stop ids while it is short of min_tokens.

    One accumulating scatter: -inf plus any bias stays -inf, so the order does not matter.
    """
    rows: list[int] = []
    ids: list[int] = []
    values: list[float] = []
    for i, s in enumerate(states):
        entries = list((s.params.logit_bias or {}).items())
        if s.blocks_stop_ids:
            entries += [(t, float("-inf")) for t in s.stop_token_ids]
        for token_id, value in entries:
            if 0 <= token_id < logits.shape[1]:
                rows.append(i)
                ids.append(token_id)
                values.append(value)
    if rows:
        index = to_device([rows, ids], torch.long, logits.device)
        add = to_device(values, logits.dtype, logits.device)
        logits.index_put_((index[0], index[1]), add, accumulate=True)


def keep_thresholds(
    logits: torch.Tensor, top_ks: list[int], top_ps: list[float], min_ps: list[float], guess: int | None = None
) -> torch.Tensor:
    """[rows]: the smallest logit each row keeps (-inf: all) under its top_k, then its top_p
    nucleus (in the distribution top_k leaves), and its min_p.

    Each filter keeps every token at or above some value, so a token tied with the smallest
    kept one stays in. The reference of the Triton kernel (engine/kernels/keep_thresholds.py),
    which finds the same values without sorting. Only the largest values of a row decide: the
    k largest for top-k (`torch.topk`); for top-p, on the CPU, the `guess` largest first
    (default `NUCLEUS_GUESS`), and the whole row sorted only when its nucleus may reach past
    them (checking that on a GPU would wait for it, so there rows with top-p are sorted whole)."""
    rows, vocab_size = logits.shape
    device = logits.device
    thresholds = torch.full((rows,), float("-inf"), dtype=logits.dtype, device=device)
    use_k = [0 < k < vocab_size for k in top_ks]
    use_p = [p < 1.0 for p in top_ps]
    if any(use_k) or any(use_p):
        ks = [k if on else 1 for k, on in zip(top_ks, use_k, strict=True)]
        width = max(ks)
        if any(use_p):
            width = max(width + 1, guess or NUCLEUS_GUESS) if device.type == "cpu" else vocab_size
        width = min(width, vocab_size)
        if width < vocab_size:
            top = logits.topk(width, dim=-1).values  # [rows, width], largest first
        else:
            top = logits.sort(dim=-1, descending=True).values
        k_rows = to_device(use_k, torch.bool, device)
        if any(use_k):
            kth = top.gather(1, to_device(ks, torch.long, device).unsqueeze(1) - 1)
            kth.masked_fill_(~k_rows.unsqueeze(1), float("-inf"))  # rows without top-k keep all
            top.masked_fill_(top < kth, float("-inf"))
            thresholds = kth.squeeze(1)
        if any(use_p):
            if width == vocab_size:
                probs = top.softmax(dim=-1)
            else:  # a row with top-k has all it keeps among the candidates, the others do not
                total = torch.where(k_rows, top.logsumexp(dim=-1), logits.logsumexp(dim=-1))
                probs = (top - total.unsqueeze(1)).exp()
            mass_before = probs.cumsum(dim=-1) - probs  # 0 for the top token: it always stays
            kept = ~(mass_before > column(top_ps, probs))  # (a row of -inf only: NaN, all kept)
            p_rows = to_device(use_p, torch.bool, device)
            smallest = top.masked_fill(~kept, float("inf")).amin(dim=-1).masked_fill_(~p_rows, float("-inf"))
            thresholds = torch.maximum(thresholds, smallest)
            if width < vocab_size:  # (the CPU) rows that may keep more than their candidates
                last = top[:, -1] > float("-inf")  # not cut by top-k: ties with its k-th may lie beyond
                unsure = p_rows & last & (kept[:, -1] | k_rows)
                again = unsure.nonzero().flatten().tolist()
                if again:
                    thresholds[again] = keep_thresholds(
                        logits[again], [top_ks[i] for i in again], [top_ps[i] for i in again], [0.0] * len(again),
                        guess=vocab_size,
                    )
    if any(m > 0.0 for m in min_ps):  # p >= min_p * p_max, in logits: x >= x_max + log(min_p)
        bound = to_device([math.log(m) if m > 0.0 else -math.inf for m in min_ps], logits.dtype, device)
        thresholds = torch.maximum(thresholds, logits.amax(dim=-1) + bound)
    return thresholds


def _token_logprob_tensors(logits: torch.Tensor, token_ids: torch.Tensor, num_top: int) -> list[torch.Tensor]:
    """[ints, floats] of rows' token_ids, ranks and top ids / their logprobs, the sampled logprobs
    and the top logprobs (see `_token_logprobs_from`): one integer and one float tensor."""
    logprobs = logits.float().log_softmax(dim=-1)  # [n, vocab]
    chosen = logprobs.gather(1, token_ids.long().unsqueeze(1))  # [n, 1]
    rank = (logprobs > chosen).sum(dim=-1) + 1
    top_lps, top_ids = logprobs.topk(num_top, dim=-1)  # [n, num_top]
    return [torch.cat([token_ids.long(), rank, top_ids.flatten()]), torch.cat([chosen.squeeze(1), top_lps.flatten()])]


def _token_logprobs_from(ints: list[int], floats: list[float], counts: list[int]) -> tuple[list[int], list[TokenLogprobs]]:
    n, num_top = len(counts), max(counts, default=0)
    out: list[TokenLogprobs] = []
    for i, k in enumerate(counts):
        ids_at, lps_at = 2 * n + i * num_top, n + i * num_top
        out.append(TokenLogprobs(ints[i], floats[i], ints[n + i], ints[ids_at : ids_at + k], floats[lps_at : lps_at + k]))
    return ints[:n], out


def _to_token_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, counts: list[int]
) -> tuple[list[int], list[TokenLogprobs]]:
    """Row i: token_ids[i], its raw logprob and rank, and its `counts[i]` best alternatives.

    Two device→host copies for the whole batch: one of integers, one of floats.
    """
    ints, floats = _token_logprob_tensors(logits, token_ids, max(counts, default=0))
    return _token_logprobs_from(ints.tolist(), floats.tolist(), counts)


def compute_prompt_logprobs(
    logits: torch.Tensor, next_token_ids: Sequence[int] | torch.Tensor, num_top: int, chunk_size: int = 512
) -> list[TokenLogprobs]:
    """logits [T, vocab] of prompt positions; next_token_ids [T]: the token that follows each.

    Works in chunks of positions so a long prompt never materialises [T, vocab] logprobs.
    """
    ids = torch.as_tensor(next_token_ids, dtype=torch.long, device=logits.device)
    out: list[TokenLogprobs] = []
    for start in range(0, logits.shape[0], chunk_size):
        end = min(start + chunk_size, logits.shape[0])
        out.extend(_to_token_logprobs(logits[start:end], ids[start:end], [num_top] * (end - start))[1])
    return out


def process_logits(
    logits: torch.Tensor, states: list[SamplingState], penalty_table: PenaltyTable | None = None,
    grammar_mask: StepMask | None = None,
) -> torch.Tensor:
    """logit_bias, min_tokens, penalties and the grammar mask applied to a copy (or `logits`
    itself if none apply). States not in a `PenaltyTable` yet go into `penalty_table` (a new
    one if None)."""
    plain = all(s.is_plain for s in states)
    if grammar_mask is None and plain:
        return logits
    processed = logits.clone()
    if not plain:  # (a constrained step's rows are mostly plain: no per-row pass for nothing)
        _apply_bias_and_min_tokens(processed, states)
        apply_penalties(processed, states, penalty_table)
    if grammar_mask is not None:
        apply_token_bitmask(processed, grammar_mask.bitmask, grammar_mask.rows)
    return processed


@dataclass(slots=True)
class PendingSample:
    """Tokens drawn on the device and copied to the host without waiting (`Sampler.sample_async`)."""

    sampled: torch.Tensor  # [num_rows] int64, on the logits' device
    copy: HostCopy  # the ids alone, or the logprob tensors (which begin with the ids)
    lp_counts: list[int | None] | None  # logprobs per row, when any row asked for them

    def done(self) -> bool:
        return self.copy.done()

    def result(self) -> SamplerOutput:
        tensors = self.copy.wait()
        if self.lp_counts is None:
            return SamplerOutput(tensors[0].tolist(), self.sampled)
        counts = [k or 0 for k in self.lp_counts]
        token_ids, rows = _token_logprobs_from(tensors[0].tolist(), tensors[1].tolist(), counts)
        logprobs = [row if k is not None else None for row, k in zip(rows, self.lp_counts, strict=True)]
        return SamplerOutput(token_ids, self.sampled, logprobs)


class Sampler:
    """Keeps the random source of unseeded rows and its rows' `PenaltyTable`."""

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)
        self._penalties: PenaltyTable | None = None  # made for the first logits' vocab and device

    def sample(
        self, logits: torch.Tensor, states: list[SamplingState], grammar_mask: StepMask | None = None
    ) -> SamplerOutput:
        """logits [num_rows, vocab] float32; states[i] belongs to row i; `grammar_mask` limits
        the constrained rows to what their grammars allow."""
        return self.sample_async(logits, states, grammar_mask).result()

    def sample_async(
        self, logits: torch.Tensor, states: list[SamplingState], grammar_mask: StepMask | None = None
    ) -> PendingSample:
        """`sample` without waiting for the device: the tokens are drawn (`PendingSample.sampled`,
        on the logits' device) and on their way to the host; `result()` waits for them. The
        states are read now: every token sampled before must be appended. Logprobs are those
        of the raw logits, the grammar's mask aside as every other processing."""
        if logits.shape[0] != len(states):
            raise ValueError(f"{logits.shape[0]} logits rows but {len(states)} sampling states")
        logits = logits.float()
        processed = process_logits(logits, states, self._penalty_table(logits), grammar_mask)
        random_rows = [i for i, s in enumerate(states) if not s.params.greedy]
        if not random_rows:
            sampled = processed.argmax(dim=-1)
        elif len(random_rows) == len(states):
            sampled = self._sample_random(processed, states)
        else:
            index = to_device(random_rows, torch.long, logits.device)
            drawn = self._sample_random(processed.index_select(0, index), [states[i] for i in random_rows])
            sampled = processed.argmax(dim=-1).index_copy_(0, index, drawn)

        lp_counts = [s.params.logprobs for s in states]
        if all(k is None for k in lp_counts):
            return PendingSample(sampled, HostCopy([sampled]), None)
        tensors = _token_logprob_tensors(logits, sampled, max(k or 0 for k in lp_counts))
        return PendingSample(sampled, HostCopy(tensors), lp_counts)

    def _penalty_table(self, logits: torch.Tensor) -> PenaltyTable:
        table = self._penalties
        if table is None or table.vocab_size != logits.shape[1] or table.device != logits.device:
            table = self._penalties = PenaltyTable(logits.shape[1], logits.device)
        return table

    def _sample_random(self, logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        """logits [n, vocab] of rows that sample (temperature > 0) → token ids [n]."""
        temps = [s.params.temperature for s in states]
        top_ks = [s.params.top_k for s in states]
        top_ps = [s.params.top_p for s in states]
        min_ps = [s.params.min_p for s in states]
        seeds = [
            step_seed(s.params.seed, s.num_output_tokens)
            if s.params.seed is not None
            else self._rng.getrandbits(63)
            for s in states
        ]
        filters = any(k > 0 for k in top_ks) or any(p < 1.0 for p in top_ps) or any(m > 0.0 for m in min_ps)
        if FUSED_RACE and use_triton():  # the temperatures go into the kernels: the logits are not copied
            return _race(logits, temps, seeds, (top_ks, top_ps, min_ps) if filters else None)
        if any(t != 1.0 for t in temps):  # the filters see the tempered logits
            logits = logits / column(temps, logits)
        kept = None
        if filters:
            kept = logits >= keep_thresholds(logits, top_ks, top_ps, min_ps).unsqueeze(1)
            logits = logits.masked_fill(~kept, float("-inf"))
        return race(logits.softmax(dim=-1), seeds, kept)


def _race(
    logits: torch.Tensor, temps: list[float], seeds: list[int],
    filters: tuple[list[int], list[float], list[float]] | None,
) -> torch.Tensor:
    """The exponential race through its Triton kernel (`FUSED_RACE`); `filters` (top_ks,
    top_ps, min_ps) come to each row's threshold first: by the search kernel from
    `SEARCH_MIN_ROWS` rows, else by the sort (`keep_thresholds`)."""
    from engine.kernels.exponential_race import exponential_race
    from engine.kernels.keep_thresholds import keep_thresholds as keep_thresholds_kernel

    device = logits.device
    logits = logits.contiguous()
    temps_t = to_device(temps, torch.float32, device)
    thresholds = None
    if filters is not None:
        top_ks, top_ps, min_ps = filters
        if logits.shape[0] >= SEARCH_MIN_ROWS:
            vocab_size = logits.shape[1]
            ks = [k if 0 < k < vocab_size else 0 for k in top_ks]  # any int: the API sets no bound
            thresholds = keep_thresholds_kernel(
                logits, temps_t, to_device(ks, torch.int32, device), to_device(top_ps, torch.float32, device),
                to_device(min_ps, torch.float32, device),
            )
        else:  # the race divides as torch does (IEEE), so its tempered logits are these
            thresholds = keep_thresholds(logits / temps_t.unsqueeze(1), top_ks, top_ps, min_ps)
    return exponential_race(logits, temps_t, to_device(seeds, torch.int64, device), thresholds)
