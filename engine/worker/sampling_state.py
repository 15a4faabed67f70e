"""What sampling remembers about each running row, and the penalties that read it.

A `SamplingState` per row holds its params and how many tokens it has produced; a penalized
row's output counts (and, with a repetition penalty, its prompt mask) are a row of a
`PenaltyTable` on the logits' device, shared by all the rows of one `Sampler`
(engine/worker/sampler.py), so that a step's penalty work is the same few launches for any number of
rows:

    append(token) on the host ─► next step: one copy + one scatter of every new id (all rows)
                              ─► index_select of the penalized rows' counts (and masks)
                              ─► repetition penalty, then presence / frequency penalties
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from engine.sampling_params import SamplingParams
from engine.worker.transfer import to_device

if TYPE_CHECKING:
    from engine.grammar import CompiledGrammar, GrammarMatcher, GrammarTokenizer


def column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """Per-row values as a [rows, 1] tensor of `like`'s dtype and device (no wait)."""
    return to_device(values, like.dtype, like.device).unsqueeze(1)


@dataclass(slots=True)
class SamplingState:
    """What sampling needs to remember about one running row.

    Created when a sequence enters the batch (again, after preemption, with the outputs it
    already has) and told every token it samples via `append`. A penalized row's output counts
    (and, with a repetition penalty, its prompt mask) live in a row of a `PenaltyTable` on the
    logits' device, taken on the first step that needs them and given back when the state is
    freed; `append` only records the id, and the table counts the ids of all its rows on the
    next step with one scatter.

    A constrained row (`params.structured_output`) is given its grammar's compilation
    (`compiled_grammar`, engine/worker/grammar_masks.py) and makes its `GrammarMatcher` at its
    first sample (`grammar_matcher`), replaying the outputs it had. `append` only records a
    token for the matcher (`grammar_ids`): the step's masks advance every row's matcher at once
    on the grammar library's threads (`GrammarMasks.fill`), and whatever reads the matcher
    first takes the tokens it has not seen (`grammar_matcher`, `blocks_stop_ids`).
    """

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int] = ()
    stop_token_ids: Collection[int] = ()  # masked while short of params.min_tokens (NewRow.stop_token_ids)
    num_output_tokens: int = field(init=False, default=0)
    _pending_ids: list[int] = field(init=False, default_factory=list)  # not yet in its table's counts
    _table: PenaltyTable | None = field(init=False, default=None)  # set on the first step it is penalized
    _slot: int = field(init=False, default=-1)  # its row of _table.counts
    _mask_slot: int = field(init=False, default=-1)  # its row of _table.prompt_mask (repetition penalty only)
    compiled_grammar: Future[CompiledGrammar] | None = field(init=False, default=None)  # a constrained row's
    grammar: GrammarMatcher | None = field(init=False, default=None)  # made at its first sample
    grammar_ids: list[int] = field(init=False, default_factory=list)  # outputs its matcher has yet to see

    def __post_init__(self) -> None:
        self.num_output_tokens = len(self.output_token_ids)
        if self.params.needs_penalties:
            self._pending_ids = list(self.output_token_ids)
        if self.params.structured_output is not None:
            self.grammar_ids = list(self.output_token_ids)  # replayed by its matcher (after preemption)
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
        if self.compiled_grammar is not None:
            self.grammar_ids.append(token_id)

    def grammar_matcher(self, tokenizer: GrammarTokenizer) -> GrammarMatcher:
        """A constrained row's matcher, with every token appended so far: made on first use from
        its compiled grammar (waiting for the compilation) and the outputs it had (a preempted
        sequence's, replayed)."""
        if self.grammar is None:
            from engine.grammar import GrammarMatcher

            assert self.compiled_grammar is not None, "an unconstrained row has no matcher"
            matcher = GrammarMatcher(self.compiled_grammar.result(), tokenizer, self.params.stop_token_ids or ())
            matcher.replay(self.grammar_ids)
            self.grammar_ids = []
            self.grammar = matcher
        elif self.grammar_ids:
            self._take_grammar_ids()
        return self.grammar

    def _take_grammar_ids(self) -> None:
        assert self.grammar is not None
        # A token its grammar refuses is one sampled for a row whose stop id the engine has
        # not seen yet (a step launched behind it): the matcher allows only stop ids then.
        self.grammar.accept_tokens(self.grammar_ids)
        self.grammar_ids.clear()

    @property
    def is_plain(self) -> bool:
        """True when nothing is done to the logits before temperature and the filters."""
        p = self.params
        return not (p.logit_bias or p.needs_penalties or self.blocks_stop_ids)

    @property
    def blocks_stop_ids(self) -> bool:
        """Short of min_tokens, the stop ids are masked; unless its grammar may end there: its
        mask allows no other token once the output is complete."""
        if self.num_output_tokens >= self.params.min_tokens or not self.stop_token_ids:
            return False
        if self.grammar is None:
            return True
        if self.grammar_ids:
            self._take_grammar_ids()
        return not self.grammar.allows_stop

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
            r = column(rep, sub)
            sub = torch.where(seen, torch.where(sub > 0, sub / r, sub * r), sub)
        freq = column([s.params.frequency_penalty for s in states], sub)
        presence = column([s.params.presence_penalty for s in states], sub)
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


def apply_penalties(logits: torch.Tensor, states: list[SamplingState], table: PenaltyTable | None) -> None:
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
