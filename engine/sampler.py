"""Batched sampling over one step's logits, in the worker process.

Each running row owns a `SamplingState` (its params and what penalties need; the penalized
rows' counts and prompt masks are rows of the sampler's one `PenaltyTable` on the device, so
a step's penalty work takes the same few launches for any number of rows). A step hands
the sampler `logits [num_rows, vocab]` and the rows' states, in the same order:

    logits ─► logit_bias ─► min_tokens (mask stop ids) ─► repetition penalty
           ─► presence / frequency penalties ─► greedy rows: argmax
                                               other rows: temperature ─► top_k ─► top_p
                                                            ─► min_p ─► exponential race

top_k, top_p and min_p each keep every token at or above some value, so together they come
to one threshold per row (`keep_thresholds`), below which the race does not look.

Sampling is an exponential race: `argmax(probs / E)` with `E ~ Exp(1)` per vocab entry picks
token i with probability `probs[i] / sum(probs)`. Each row's `E` is a counter-based stream of
one 63-bit seed: for a seeded request a hash of (seed, number of tokens generated so far), so
its tokens do not depend on the batch it shares or on preemption; for the others a draw from
the sampler's own random source. Logprobs describe the raw distribution (log_softmax of the
logits before any processing). Everything is plain torch, so CPU and CUDA behave alike;
with the Triton backend the thresholds and the race are two Triton kernels (`FUSED_RACE`),
which neither sort nor copy the logits: the same draws up to rounding.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from engine.layers.backend import use_triton
from engine.sampling_params import SamplingParams
from engine.transfer import HostCopy, to_device

# On a GPU with the Triton backend, draw sampled tokens with one fused kernel
# (engine/kernels/exponential_race.py) instead of the torch ops below: same draws up to
# rounding in near-ties. On the H200 at 1 024 rows x 128 k vocabulary, temperature alone:
# 1.47 ms against 12.3 (scripts/sampler_bench.py --fused, docs/benchmarks.md).
FUSED_RACE = True
# With it, from this many rows top-k / top-p thresholds come from the search kernel
# (engine/kernels/keep_thresholds.py), below it from torch's sort. H200, 128 k vocabulary,
# top_p 0.9, ms per step with the race (docs/benchmarks.md, 2026-12-02): sorting (as it was
# then: a masked sorted copy scattered back) 1.7 / 4.5 / 16.9 at 64 / 256 / 1 024 rows,
# searching 3.0-3.1 / 4.6-5.1 / 7.3. The search runs one program per row, which leaves most of
# the GPU idle when there are few rows.
SEARCH_MIN_ROWS = 256

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


class TokenLogprobs(NamedTuple):
    sampled_logprob: float  # of the sampled (or actual prompt) token
    sampled_rank: int  # 1 = most likely
    top_ids: list[int]  # most likely first
    top_logprobs: list[float]


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]  # one per row
    sampled: torch.Tensor  # [num_rows] int64, on the logits' device (next step's input ids)
    logprobs: list[TokenLogprobs | None] | None = None  # None for rows that asked for none


@dataclass(slots=True)
class SamplingState:
    """What sampling needs to remember about one running row.

    Created when a sequence enters the batch (again, after preemption, with the outputs it
    already has) and told every token it samples via `append`. A penalized row's output counts
    (and, with a repetition penalty, its prompt mask) live in a row of a `PenaltyTable` on the
    logits' device, taken on the first step that needs them and given back when the state is
    freed; `append` only records the id, and the table counts the ids of all its rows on the
    next step with one scatter.
    """

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int] = ()
    num_output_tokens: int = field(init=False, default=0)
    _pending_ids: list[int] = field(init=False, default_factory=list)  # not yet in its table's counts
    _table: PenaltyTable | None = field(init=False, default=None)  # set on the first step it is penalized
    _slot: int = field(init=False, default=-1)  # its row of _table.counts
    _mask_slot: int = field(init=False, default=-1)  # its row of _table.prompt_mask (repetition penalty only)

    def __post_init__(self) -> None:
        self.num_output_tokens = len(self.output_token_ids)
        if self.params.needs_penalties:
            self._pending_ids = list(self.output_token_ids)
        if self.params.repetition_penalty == 1.0:
            self.prompt_token_ids = ()  # only the repetition penalty looks at the prompt
        self.output_token_ids = ()  # counted from here on; the engine keeps the ids

    def __del__(self) -> None:
        # Its table rows go back when the state is freed: when the model runner has dropped it
        # (its row freed or reused) and the last step that sampled it is done with it.
        table = getattr(self, "_table", None)  # unset if __init__ failed
        if table is not None:
            table._free(self._slot, self._mask_slot)

    def append(self, token_id: int) -> None:
        self.num_output_tokens += 1
        if self.params.needs_penalties:
            self._pending_ids.append(token_id)

    @property
    def is_plain(self) -> bool:
        """True when nothing is done to the logits before temperature and the filters."""
        p = self.params
        return not (p.logit_bias or p.needs_penalties or self.blocks_stop_ids)

    @property
    def blocks_stop_ids(self) -> bool:
        p = self.params
        return self.num_output_tokens < p.min_tokens and bool(p.all_stop_token_ids)

    def output_counts(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        """[vocab] int32: how often each token occurs in the output so far (a view of its row)."""
        table = self._table or PenaltyTable(vocab_size, device)
        table.update([self])
        return table.counts[self._slot]


class PenaltyTable:
    """The penalized rows' output counts and prompt masks, on the logits' device: one row
    (slot) of `counts` per state, one of `prompt_mask` per state with a repetition penalty.

    A `Sampler` keeps one for all its rows, so that a step's penalty work is a constant number
    of launches whatever the number of rows: one copy and one scatter for every id appended
    since the last step, one gather of the rows it penalizes. A state takes its slots on the
    first step that penalizes it and gives them back when it is freed (`SamplingState.__del__`:
    the model runner drops a row's state when the row is freed or reused, a test or a benchmark
    when it lets go of its states), so slots are reused and a state can never lose its counts
    while something still holds it. Capacity doubles when no slot is free, keeping the rows it had:
    memory follows the most penalized rows alive at once, never the batch size.
    """

    def __init__(self, vocab_size: int, device: torch.device | str) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.counts = torch.zeros(0, vocab_size, dtype=torch.int32, device=device)  # [capacity, vocab]
        self.prompt_mask = torch.zeros(0, vocab_size, dtype=torch.bool, device=device)  # [mask capacity, vocab]
        self._free_slots: list[int] = []  # stacks (pop from the end): after a growth, its lowest slot next
        self._free_mask_slots: list[int] = []

    def update(self, states: list[SamplingState]) -> None:
        """Give the states without a table slots in this one (their prompts marked), then count
        every id appended since the last step, all rows at once."""
        new = list({id(s): s for s in states if s._table is None}.values())  # a state may occur twice
        if new:
            self._assign(new)
        slots: list[int] = []
        ids: list[int] = []
        for s in states:
            if s._table is self and s._pending_ids:  # (a state in another table is counted there)
                slots += [s._slot] * len(s._pending_ids)
                ids += s._pending_ids
                s._pending_ids.clear()
        if ids:
            index = to_device([slots, ids], torch.long, self.device)
            ones = torch.ones_like(index[0], dtype=torch.int32)
            self.counts.index_put_((index[0], index[1]), ones, accumulate=True)

    def penalize(self, logits: torch.Tensor, rows: list[int], states: list[SamplingState]) -> None:
        """Repetition penalty (prompt + output), then OpenAI's presence and frequency penalties,
        on `logits[rows]` in place; states[j] (in this table after `update`) belongs to rows[j]."""
        self.update(states)
        rep = [s.params.repetition_penalty for s in states]
        # A state without a mask row has no repetition penalty: any row does, as r = 1 leaves
        # its logits as they are.
        slots = [[s._slot for s in states], [max(s._mask_slot, 0) for s in states]]
        index = to_device([rows, *slots], torch.long, self.device)  # [3, num_penalized]: rows, slots, mask slots
        sub = logits.index_select(0, index[0])  # [num_penalized, vocab]
        counts = self.counts.index_select(0, index[1])
        if any(r != 1.0 for r in rep):
            seen = (counts > 0) | self.prompt_mask.index_select(0, index[2])
            r = _column(rep, sub)
            sub = torch.where(seen, torch.where(sub > 0, sub / r, sub * r), sub)
        freq = _column([s.params.frequency_penalty for s in states], sub)
        presence = _column([s.params.presence_penalty for s in states], sub)
        sub = sub - freq * counts - presence * (counts > 0)
        logits.index_copy_(0, index[0], sub)

    def _assign(self, new: list[SamplingState]) -> None:
        """Slots for states new to this table, and their prompts in the mask, batched."""
        self.counts, slots = self._take(self.counts, self._free_slots, len(new))
        masked = [s for s in new if s.params.repetition_penalty != 1.0]
        self.prompt_mask, mask_slots = self._take(self.prompt_mask, self._free_mask_slots, len(masked))
        for s, slot in zip(new, slots, strict=True):
            s._table, s._slot = self, slot
        prompt_slots: list[int] = []
        prompt_ids: list[int] = []
        for s, slot in zip(masked, mask_slots, strict=True):
            s._mask_slot = slot
            ids = [t for t in s.prompt_token_ids if t < self.vocab_size]
            prompt_slots += [slot] * len(ids)
            prompt_ids += ids
        if prompt_ids:  # `mask[slots, ids] = True` would wait for the GPU
            index = to_device([prompt_slots, prompt_ids], torch.long, self.device)
            self.prompt_mask.index_put_((index[0], index[1]), torch.ones_like(index[0], dtype=torch.bool))

    def _take(self, table: torch.Tensor, free: list[int], n: int) -> tuple[torch.Tensor, list[int]]:
        """`table` (grown if fewer than n slots are free) and n of its free slots, zeroed.

        This relies on all of the sampler's work running on one CUDA stream, in order: a slot
        freed by a state may be handed out at once, since a step still queued that reads it
        was queued before this zeroing and so reads the old owner's row; the rows copied into
        a grown table are likewise the ones every step queued so far left there."""
        if n == 0:
            return table, []
        if len(free) < n:
            capacity = table.shape[0]
            grown = table.new_zeros(max(2 * capacity, capacity + n - len(free)), self.vocab_size)
            grown[:capacity] = table
            free[:0] = range(grown.shape[0] - 1, capacity - 1, -1)  # under the freed ones
            table = grown
        slots = [free.pop() for _ in range(n)]
        table.index_fill_(0, to_device(slots, torch.long, self.device), 0)
        return table, slots

    def _free(self, slot: int, mask_slot: int) -> None:
        """A state's slots, back when it is freed (maybe in another thread: appends only)."""
        self._free_slots.append(slot)
        if mask_slot >= 0:
            self._free_mask_slots.append(mask_slot)


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return to_device(values, like.dtype, like.device).unsqueeze(1)


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
            entries += [(t, float("-inf")) for t in s.params.all_stop_token_ids]
        for token_id, value in entries:
            if 0 <= token_id < logits.shape[1]:
                rows.append(i)
                ids.append(token_id)
                values.append(value)
    if rows:
        index = to_device([rows, ids], torch.long, logits.device)
        add = to_device(values, logits.dtype, logits.device)
        logits.index_put_((index[0], index[1]), add, accumulate=True)


def _apply_penalties(logits: torch.Tensor, states: list[SamplingState], table: PenaltyTable | None) -> None:
    """The penalties of the rows that have any, through the table each state is in: the one it
    first met, `table` for those in none (a new one if None). A sampler's rows are all in its own."""
    groups: dict[PenaltyTable, list[int]] = {}
    for i, s in enumerate(states):
        if s.params.needs_penalties:
            owner = s._table or table
            if owner is None:
                owner = table = PenaltyTable(logits.shape[1], logits.device)
            groups.setdefault(owner, []).append(i)
    for t, rows in groups.items():
        t.penalize(logits, rows, [states[i] for i in rows])


def keep_thresholds(logits: torch.Tensor, top_ks: list[int], top_ps: list[float], min_ps: list[float]) -> torch.Tensor:
    """[rows]: the smallest logit each row keeps (-inf: all) under its top_k, then its top_p
    nucleus (in the distribution top_k leaves), and its min_p.

    Each filter keeps every token at or above some value, so a token tied with the smallest
    kept one stays in. The reference of the Triton kernel (engine/kernels/keep_thresholds.py),
    which finds the same values without sorting."""
    rows, vocab_size = logits.shape
    thresholds = torch.full((rows,), float("-inf"), dtype=logits.dtype, device=logits.device)
    use_k = any(0 < k < vocab_size for k in top_ks)
    use_p = any(p < 1.0 for p in top_ps)
    if use_k or use_p:
        sorted_logits = logits.sort(dim=-1, descending=True).values
        if use_k:
            ks = [k if 0 < k < vocab_size else vocab_size for k in top_ks]
            kth = sorted_logits.gather(1, to_device(ks, torch.long, logits.device).unsqueeze(1) - 1)
            sorted_logits.masked_fill_(sorted_logits < kth, float("-inf"))
            thresholds = kth.squeeze(1)
        if use_p:
            probs = sorted_logits.softmax(dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs  # 0 for the top token: it always stays
            ps = _column([p if p < 1.0 else 2.0 for p in top_ps], probs)
            smallest = sorted_logits.masked_fill(mass_before > ps, float("inf")).amin(dim=-1)
            thresholds = torch.maximum(thresholds, smallest)
    if any(m > 0.0 for m in min_ps):  # p >= min_p * p_max, in logits: x >= x_max + log(min_p)
        bound = to_device([math.log(m) if m > 0.0 else -math.inf for m in min_ps], logits.dtype, logits.device)
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
        out.append(TokenLogprobs(floats[i], ints[n + i], ints[ids_at : ids_at + k], floats[lps_at : lps_at + k]))
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
    logits: torch.Tensor, states: list[SamplingState], penalty_table: PenaltyTable | None = None
) -> torch.Tensor:
    """logit_bias, min_tokens and penalties applied to a copy (or `logits` itself if none apply).
    States not in a `PenaltyTable` yet go into `penalty_table` (a new one if None)."""
    if all(s.is_plain for s in states):
        return logits
    processed = logits.clone()
    _apply_bias_and_min_tokens(processed, states)
    _apply_penalties(processed, states, penalty_table)
    return processed


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
    seed = to_device(seeds, torch.int64, device).unsqueeze(1)
    counter = torch.arange(1, vocab_size + 1, dtype=torch.int64, device=device)
    x = seed + counter * _int64(0x9E3779B97F4A7C15)  # [n, vocab]
    x = (x ^ _srl(x, 30)) * _int64(0xBF58476D1CE4E5B9)
    x = (x ^ _srl(x, 27)) * _int64(0x94D049BB133111EB)
    x = x ^ _srl(x, 31)
    return unit_interval(x).log_().neg_()


def unit_interval(x: torch.Tensor) -> torch.Tensor:
    """int64 random bits -> float32 uniforms in (0, 1): the top 23 bits, plus a half.

    23 and not 24: (2**24 - 1 + 0.5) rounds to 2**24 in float32, so one draw in 2**24 would be
    exactly 1, its Exp(1) noise 0 and its token the winner whatever its probability (a masked
    one too): with a 128 k vocabulary, one row in ~130 at every step."""
    return (_srl(x, 41).float() + 0.5) * 2.0**-23


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

    def sample(self, logits: torch.Tensor, states: list[SamplingState]) -> SamplerOutput:
        """logits [num_rows, vocab] float32; states[i] belongs to row i."""
        return self.sample_async(logits, states).result()

    def sample_async(self, logits: torch.Tensor, states: list[SamplingState]) -> PendingSample:
        """`sample` without waiting for the device: the tokens are drawn (`PendingSample.sampled`,
        on the logits' device) and on their way to the host; `result()` waits for them. The
        states are read now: every token sampled before must be appended."""
        if logits.shape[0] != len(states):
            raise ValueError(f"{logits.shape[0]} logits rows but {len(states)} sampling states")
        logits = logits.float()
        processed = process_logits(logits, states, self._penalty_table(logits))
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
            logits = logits / _column(temps, logits)
        if filters:
            thresholds = keep_thresholds(logits, top_ks, top_ps, min_ps).unsqueeze(1)
            logits = logits.masked_fill(logits < thresholds, float("-inf"))
        probs = logits.softmax(dim=-1)
        noise = exponential_noise(seeds, probs.shape[1], probs.device)
        return (probs / noise).argmax(dim=-1)


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
