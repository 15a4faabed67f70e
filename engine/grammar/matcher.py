"""One sequence's place in its grammar, and the next-token bitmask it allows.

A `GrammarMatcher` follows one sequence's output tokens (each choice of a request has its
own). Before each sampled token it writes which ids may come next into one row of a
[rows, ceil(vocab / 32)] int32 bitmask (bit j of word i: id 32 * i + j); after it, it
accepts the sampled id. A stop id (the tokenizer's end-of-generation ids, plus the request's
own stop ids) is allowed exactly when the output so far is complete; once accepted the matcher
is terminated. A matcher that was handed an id its grammar refuses (it should not be: the
sampler applies the mask) allows only stop ids from then on, so generation ends soon.

`rollback(n)` undoes the last n accepted tokens; `replay(ids)` starts again from a sequence's
output tokens (a preempted sequence that comes back). `fill_bitmasks` fills the rows of many
matchers at once, and `accept_allowed` advances many by a token each, on the library's threads
(they drop the GIL). A matcher is used by one thread at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import llguidance
import torch

from engine.grammar.compiler import CompiledGrammar, GrammarTokenizer

_executors: dict[int | None, llguidance.LLExecutor] = {}
# A row allowing only these stop ids, per (row width, stop ids): a finished matcher's row each step.
_stops_rows: dict[tuple[int, frozenset[int]], torch.Tensor] = {}


class GrammarMatcher:
    __slots__ = ("_m", "_words", "_stop_ids", "_extra_stop_ids", "_num_tokens", "_terminated", "_failed")

    def __init__(self, compiled: CompiledGrammar, tokenizer: GrammarTokenizer, stop_token_ids: Iterable[int] = ()) -> None:
        self._m = compiled.template.deep_copy()  # the compiled parser is shared, the state is ours
        self._words = tokenizer.bitmask_words
        self._stop_ids = tokenizer.eos_token_ids | frozenset(stop_token_ids)
        # The library knows the tokenizer's ids; the request's own are set by hand after it.
        self._extra_stop_ids = sorted(self._stop_ids - tokenizer.eos_token_ids)
        self._num_tokens = 0  # accepted so far (a stop id included)
        self._terminated = False  # a stop id was accepted
        self._failed = False  # a refused id was offered since the last rollback / reset

    @property
    def is_terminated(self) -> bool:
        """A stop id was accepted: the output is complete."""
        return self._terminated

    @property
    def is_accepting(self) -> bool:
        """The output so far is complete: a stop id may come next."""
        return not self._failed and not self._terminated and self._m.is_accepting()

    @property
    def allows_stop(self) -> bool:
        """A stop id may come next: the output is complete, or nothing but a stop id may follow
        (terminated, or handed a refused id)."""
        return self._done() or self._m.is_accepting()

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    def accept(self, token_id: int) -> bool:
        """Advance by `token_id`; False (and the state unchanged) when the grammar refuses it."""
        if self._terminated or self._failed:
            self._failed = True
            return False
        if token_id in self._stop_ids:
            if not self._m.is_accepting():
                self._failed = True
                return False
            self._terminated = True
        elif self._m.try_consume_tokens([token_id]) != 1:  # try_: a refusal leaves no error state
            self._failed = True
            return False
        self._num_tokens += 1
        return True

    def accept_tokens(self, token_ids: Iterable[int]) -> bool:
        """Accept each in turn; False at the first refused (those before it stay accepted)."""
        return all(self.accept(t) for t in token_ids)

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens (and forget a refused one offered since)."""
        if not 0 <= num_tokens <= self._num_tokens:
            raise ValueError(f"cannot roll back {num_tokens} of {self._num_tokens} tokens")
        self._failed = False  # a refused id never reached the grammar's state
        if num_tokens == 0:
            return
        grammar_tokens = num_tokens - 1 if self._terminated else num_tokens  # a stop id is ours alone
        if grammar_tokens and not self._m.rollback(grammar_tokens):
            raise RuntimeError(f"the grammar could not roll back {grammar_tokens} tokens: {self._m.get_error()}")
        self._terminated = False
        self._num_tokens -= num_tokens

    def reset(self) -> None:
        """Back to the start state, as if no token had been accepted."""
        self._m.reset()
        self._num_tokens = 0
        self._terminated = False
        self._failed = False

    def replay(self, token_ids: Sequence[int]) -> bool:
        """Reset, then accept `token_ids` (a preempted sequence's output, when it comes back)."""
        self.reset()
        return self.accept_tokens(token_ids)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the ids allowed next into `bitmask[row]` ([rows, ceil(vocab / 32)] int32, CPU,
        contiguous)."""
        _check_bitmask(bitmask, self._words)
        if not 0 <= row < bitmask.shape[0]:
            raise ValueError(f"row {row} is outside the bitmask's {bitmask.shape[0]} rows")
        if self._done():
            self._only_stops(bitmask[row])
            return
        target = bitmask[row]
        self._m.unsafe_compute_mask_ptr(target.data_ptr(), self._words * 4)
        self._finish_row(target)

    def _done(self) -> bool:
        return self._terminated or self._failed

    def _finish_row(self, target: torch.Tensor) -> None:
        """After the library wrote `target`: its failure means only stops; the request's own
        stop ids follow the library's verdict on completeness."""
        if self._m.is_error():
            self._failed = True
            self._only_stops(target)
            return
        if self._extra_stop_ids:
            _set_bits(target, self._extra_stop_ids, self._m.is_accepting())

    def _only_stops(self, target: torch.Tensor) -> None:
        key = (target.shape[0], self._stop_ids)
        row = _stops_rows.get(key)
        if row is None:
            row = torch.zeros(target.shape[0], dtype=torch.int32)
            _set_bits(row, sorted(self._stop_ids), True)
            if len(_stops_rows) < 64:  # (request stop ids vary: keep the common few)
                _stops_rows[key] = row
        target.copy_(row)


def fill_bitmasks(
    rows: Sequence[tuple[GrammarMatcher, int]], bitmask: torch.Tensor, num_threads: int | None = None
) -> None:
    """`matcher.fill_bitmask(bitmask, row)` for each (matcher, row), the library's part on
    `num_threads` threads of its own (None: its default, most of the machine's cores): the
    caller's thread waits, without the GIL."""
    if not rows:
        return
    words = rows[0][0]._words
    _check_bitmask(bitmask, words)
    num_rows = bitmask.shape[0]
    if any(m._words != words for m, _ in rows):
        raise ValueError("the matchers of one bitmask must share a tokenizer")
    if not all(0 <= row < num_rows for _, row in rows):
        raise ValueError(f"a row is outside the bitmask's {num_rows} rows")
    live = [(m._m, row) for m, row in rows if not (m._terminated or m._failed)]
    if live:
        _get_executor(num_threads).unsafe_compute_mask_ptr(live, bitmask.data_ptr(), words * 4, num_rows)
    for matcher, row in rows:
        if matcher._terminated or matcher._failed:
            matcher._only_stops(bitmask[row])
        elif matcher._extra_stop_ids or matcher._m.is_error():  # (rare: one call each otherwise)
            matcher._finish_row(bitmask[row])


def accept_allowed(rows: Sequence[tuple[GrammarMatcher, int]], num_threads: int | None = None) -> None:
    """`matcher.accept(token_id)` for each (matcher, token_id), where each token is one that the
    matcher's last filled bitmask row allowed (the caller checked it): those the library decides
    go to its threads at once (`num_threads` as for `fill_bitmasks`), without the GIL; stop ids
    and finished matchers take `accept`. Should the library refuse a token its own mask allowed,
    that matcher allows only stop ids from then on, as after `accept` of a refused token (but
    `rollback` cannot undo it)."""
    par: list[tuple[llguidance.LLMatcher, int]] = []
    advanced: list[GrammarMatcher] = []
    for matcher, token_id in rows:
        if matcher._terminated or matcher._failed or token_id in matcher._stop_ids:
            matcher.accept(token_id)
        else:
            par.append((matcher._m, token_id))
            advanced.append(matcher)
    if not par:
        return
    consumed = _get_executor(num_threads).consume_token_par(par)
    for matcher, ok in zip(advanced, consumed, strict=True):
        if ok:
            matcher._num_tokens += 1
        else:
            matcher._failed = True


def _get_executor(num_threads: int | None) -> llguidance.LLExecutor:
    executor = _executors.get(num_threads)
    if executor is None:
        executor = _executors[num_threads] = llguidance.LLExecutor(num_threads)
    return executor


def _check_bitmask(bitmask: torch.Tensor, words: int) -> None:
    if (
        bitmask.dim() != 2 or bitmask.dtype != torch.int32 or bitmask.device.type != "cpu"
        or not bitmask.is_contiguous() or bitmask.shape[1] != words
    ):
        raise ValueError(
            f"the bitmask must be a contiguous int32 [rows, {words}] tensor on the CPU, got {bitmask.dtype} "
            f"{list(bitmask.shape)} on {bitmask.device}"
        )


def _set_bits(target: torch.Tensor, token_ids: Sequence[int], allowed: bool) -> None:
    """Set (or clear) the bits of `token_ids` in one bitmask row (int32 words)."""
    for token_id in token_ids:
        word, bit = divmod(token_id, 32)
        if word >= target.shape[0]:
            continue
        value = int(target[word]) & 0xFFFFFFFF
        value = value | (1 << bit) if allowed else value & ~(1 << bit)
        target[word] = value - (1 << 32) if value >= 1 << 31 else value
