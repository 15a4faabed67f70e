"""Constrained decoding in the worker: each constrained row's matcher, each step's token bitmask.

The worker has its own `GrammarCompiler` (the model's tokenizer, eos ids and logits width, as
the server's), built on a thread of its own once the worker is ready (`start`), so that the
first constrained request does not wait for it. Every rank runs the same matchers on the same
tokens, so every rank masks and samples alike.

    NewRow with a constraint ─► `compile` on that thread (the server compiled the same
                                 constraint: usually a cache hit, never an error)
    launch: forward queued, previous tokens appended (recorded only) ─► `fill(states)`:
        the previous step's tokens, each checked against the bit its row's mask gave it,
        ─► every matcher advanced by its token at once, on the library's threads
        each constrained row's matcher (made at its first sample: replays its outputs)
        ─► one bitmask row each, on the library's threads, into fresh pinned memory
        ─► copied to the device on a side stream ─► the sampler applies it last

Nothing here waits for the device: the host fills the mask while the device runs the step's
forward pass, and the copy runs beside it. The matchers' advance waits for the same point, not
for the previous step's result to be sent: per row, only Python list work runs on the GIL.
A step with no constrained row does none of this (`ModelRunner` calls `fill` only while it
has constrained rows).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.worker.transfer import to_device

if TYPE_CHECKING:
    from engine.grammar import CompiledGrammar, GrammarCompiler
    from engine.structured_output import StructuredOutput
    from engine.worker.sampling_state import SamplingState


@dataclass(slots=True)
class StepMask:
    """A step's grammar bitmask on the logits' device: `bitmask[k]` ([k, ceil(vocab / 32)]
    int32) is for row `rows[k]` of the step's sampled logits."""

    bitmask: torch.Tensor
    rows: torch.Tensor  # [k] int64


class GrammarMasks:
    """The worker's grammar compiler (built in the background) and the masks of its steps."""

    def __init__(self, device: str | torch.device, num_threads: int | None = None) -> None:
        self.device = torch.device(device)
        self.num_threads = num_threads  # the library's threads for a step's masks (None: its default)
        # One thread: the compiler's build, then each new constraint's compilation, in order.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightgate-grammar")
        self._compiler: Future[GrammarCompiler] | None = None
        self._stream: torch.cuda.Stream | None = None
        self._lock = threading.Lock()
        # The last step's host bitmask and the states of its rows, in order: the next `fill`
        # checks each row's sampled token against it before the library takes it.
        self._last: tuple[torch.Tensor, list[SamplingState]] | None = None

    def start(self, build: Callable[[], GrammarCompiler]) -> None:
        """Build the compiler on this object's thread (`build` may take seconds)."""
        with self._lock:
            if self._compiler is None:
                self._compiler = self._pool.submit(build)

    def compile(self, so: StructuredOutput) -> Future[CompiledGrammar]:
        """`so` compiled on this object's thread, after the compiler's build."""
        compiler = self._compiler
        if compiler is None:
            raise ValueError("this model has no tokenizer: constrained decoding needs one", "structured_output")
        return self._pool.submit(lambda: compiler.result().compile(so))

    def fill(self, states: list[SamplingState]) -> StepMask | None:
        """The bitmask of a step whose sampled rows have these states (in order), on the
        device, for the constrained ones; None when none is. Every token sampled before must
        have been appended."""
        constrained = [i for i, s in enumerate(states) if s.compiled_grammar is not None]
        if not constrained:
            return None
        from engine.grammar import fill_bitmasks

        assert self._compiler is not None  # (a state got its compilation from it)
        tokenizer = self._compiler.result().tokenizer
        self._take_tokens()
        rows = [states[i] for i in constrained]
        matchers = [(state.grammar_matcher(tokenizer), k) for k, state in enumerate(rows)]
        # Fresh pinned memory each step (the host allocator's cache): a copy still queued never
        # reads a row the next step rewrites. Every row is written whole: no need to clear it.
        on_gpu = self.device.type == "cuda"
        bitmask = torch.empty((len(constrained), tokenizer.bitmask_words), dtype=torch.int32, pin_memory=on_gpu)
        fill_bitmasks(matchers, bitmask, self.num_threads)
        self._last = (bitmask, rows)
        if not on_gpu:
            return StepMask(bitmask, torch.tensor(constrained, dtype=torch.int64))
        return StepMask(self._copy(bitmask), to_device(constrained, torch.long, self.device))

    def forget_last_step(self) -> None:
        """For a step with no constrained row (None, as its mask): let go of the last constrained
        step's bitmask and states, kept for their tokens, whose rows are all freed now."""
        self._last = None

    def _take_tokens(self) -> None:
        """The last step's rows' matchers advanced by the token each sampled under its mask, at
        once on the library's threads. A token its row's mask did not allow (one sampled behind
        a stop id, see `SamplingState.append`), or a row with more than one token waiting, is left
        to `grammar_matcher`, which takes it alone as the matcher's `accept` decides."""
        if self._last is None:
            return
        from engine.grammar import accept_allowed

        bitmask, states = self._last
        self._last = None
        words = bitmask.numpy()
        num_ids = 32 * words.shape[1]
        taken = []
        for k, state in enumerate(states):
            ids = state.grammar_ids
            if len(ids) == 1 and state.grammar is not None:
                token = ids[0]
                # (`item` gives the int32 word as a Python int: >> keeps the sign, & 1 the bit)
                if 0 <= token < num_ids and (words.item(k, token >> 5) >> (token & 31)) & 1:
                    taken.append((state.grammar, token))
                    ids.clear()
        accept_allowed(taken, self.num_threads)

    def _copy(self, bitmask: torch.Tensor) -> torch.Tensor:
        """`bitmask` on the device, copied on a side stream that the compute stream waits for:
        the copy (4 bytes x vocab / 32 a row) runs beside the forward pass, not after it."""
        main = torch.cuda.current_stream(self.device)
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._stream):
            on_device = bitmask.to(self.device, non_blocking=True)
        main.wait_stream(self._stream)
        on_device.record_stream(main)  # its memory is not reused before the sampler is done with it
        return on_device
