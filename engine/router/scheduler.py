"""The router: which sequences compute which tokens in the next step.

There is no prefill or decode phase. Every sequence has `num_computed_tokens` catching up to
`num_tokens`; a step is a token budget (`max_num_batched_tokens`) filled in this order:

1. running sequences that need one token (decodes), oldest first;
2. running sequences still prefilling, next chunk, oldest first;
3. waiting sequences, first come first served, while a `req_to_token` row, slots, budget and
   the future-usage check allow (`engine/router/admission.py`).

Preemption is by recompute: when a running sequence cannot get a slot, the most recently
arrived running sequence not yet scheduled in this step gives up its slots and row and goes to
the front of the waiting queue with its output kept. Admission never preempts.

Prefix cache (`enable_prefix_caching`): a waiting sequence starts from the longest cached prefix
of its tokens but the last (it locks that path and takes references on its slots); a sequence
that finishes, is preempted or aborted caches its computed tokens before dropping its own
references; when the pool runs short, unlocked cached prefixes are evicted before anyone is
preempted, and admission counts them as free. A prompt is also cached (and locked) as soon as
its prefill is done, so siblings of `n > 1` and later requests with the same prefix reuse it
while its sequence still runs: a burst of requests sharing a system prompt computes it once.

A step is a list of `SeqStep`s (engine/messages.py), the type the worker receives: each names
its row, the tokens to compute and their slots, a `NewRow` when the sequence (re)enters a row,
and, in a field that is never pickled, the router's `Seq`.

The caller's loop: `schedule()` → run the step → `update_after_step(out)` → append sampled
tokens → `finish(seq, status)` for those that ended. An overlapped caller plans step k+1
while step k runs: it calls `update_after_step` as soon as a step is sent (the worker runs
steps in order, so their K/V are in the pool before any later step reads them) and gives each
sequence that step k samples a placeholder token (`Seq.add_placeholder`), which step
k+1 computes; a sequence whose last token is in flight is skipped. Rows in `freed_rows` must
be reset by the worker before it applies the step's new rows (a freed row may be handed out
again).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engine.errors import PromptTooLongError
from engine.messages import NewRow, SeqStep
from engine.router.admission import Admission
from engine.router.image_budget import ImageBudget
from engine.router.prefix_cache import RadixPrefixCache
from engine.router.scheduler_config import SchedulerConfig
from engine.router.seq import Seq, SequenceStatus
from engine.router.slot_allocator import KVSlotAllocator, ReqRowAllocator

_EVICT_CHUNK_DIVISOR = 256  # a full pool evicts at least 1/256 of it at a time


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    scheduled: list[SeqStep]  # each with its `seq`; the step plan's entries, in plan order
    freed_rows: list[int]  # rows released since the previous schedule(), to reset first
    preempted: list[Seq]
    num_batched_tokens: int


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: KVSlotAllocator) -> None:
        if allocator.num_slots != config.num_slots:
            raise ValueError(f"allocator has {allocator.num_slots} slots, config says {config.num_slots}")
        self.config = config
        self.allocator = allocator
        self.rows = ReqRowAllocator(config.max_num_seqs)
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []  # sorted by arrival at the start of each schedule()
        self._unfinished: dict[str, list[Seq]] = {}  # request_id -> its unfinished sequences
        self._freed_rows: list[int] = []
        self.num_preemptions = 0  # total, for stats
        self.prefix_cache = RadixPrefixCache(allocator) if config.enable_prefix_caching else None
        self._evict_chunk = max(1, config.num_slots // _EVICT_CHUNK_DIVISOR)
        self.image_budget = ImageBudget(config.max_image_tokens_per_step)
        self.admission = Admission(self)

    # -- queries ---------------------------------------------------------------------------------

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def prefix_cache_queries(self) -> int:
        """Tokens of admitted sequences looked up in the prefix cache."""
        return self.admission.prefix_cache_queries

    @property
    def prefix_cache_hits(self) -> int:
        """Of `prefix_cache_queries`, the tokens found."""
        return self.admission.prefix_cache_hits

    @property
    def kv_usage(self) -> float:
        """Fraction of the pool in use, leaving out cached prefixes that could be evicted."""
        evictable = self.prefix_cache.num_evictable_tokens if self.prefix_cache is not None else 0
        return (self.allocator.num_used - evictable) / self.allocator.num_slots

    def reset_prefix_cache(self) -> int:
        """Evict every unlocked cached prefix; returns the slots freed."""
        return self.prefix_cache.evict_all() if self.prefix_cache is not None else 0

    def siblings(self, request_id: str) -> list[Seq]:
        """The unfinished sequences of a request."""
        return self._unfinished[request_id]

    # -- requests --------------------------------------------------------------------------------

    def add(self, seq: Seq) -> None:
        """Queue a new sequence (FCFS). Raises ValueError for one that could never fit."""
        if seq.status is not SequenceStatus.WAITING or seq.num_computed_tokens or seq.slots:
            raise ValueError(f"sequence {seq.seq_id} is not new")
        if seq.num_prompt_tokens + seq.max_tokens > self.config.max_model_len:
            raise PromptTooLongError(self.config.max_model_len, seq.num_prompt_tokens, seq.max_tokens)
        if seq.num_prompt_tokens + seq.max_tokens > self.config.num_slots:
            raise ValueError(
                f"{seq.num_prompt_tokens} prompt + {seq.max_tokens} output tokens exceed the KV cache "
                f"of {self.config.num_slots} tokens"
            )
        siblings = self._unfinished.setdefault(seq.request_id, [])
        if any(s.seq_id == seq.seq_id for s in siblings):
            raise ValueError(f"sequence {seq.seq_id} is already scheduled")
        siblings.append(seq)
        self.waiting.append(seq)

    def abort(self, request_id: str) -> list[Seq]:
        """Finish all sequences of a request now, freeing their slots and rows."""
        seqs = self._unfinished.pop(request_id, [])
        if not seqs:
            return []
        self.running = [s for s in self.running if s.request_id != request_id]
        if any(s.status is SequenceStatus.WAITING for s in seqs):
            self.waiting = deque(s for s in self.waiting if s.request_id != request_id)
        for seq in seqs:
            seq.drop_placeholders()
            self._release(seq)
            seq.status = SequenceStatus.FINISHED_ABORTED
        return seqs

    def finish(self, seq: Seq, status: SequenceStatus) -> None:
        """Mark a sequence finished and free its slots and row. A no-op if it already finished
        (for example aborted while its step ran)."""
        if not status.is_finished:
            raise ValueError(f"{status} is not a finished status")
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        seq.drop_placeholders()
        self._release(seq)
        seq.status = status
        siblings = self._unfinished[seq.request_id]
        siblings.remove(seq)
        if not siblings:
            del self._unfinished[seq.request_id]
        if status in (SequenceStatus.FINISHED_STOPPED, SequenceStatus.FINISHED_LENGTH):
            self.admission.observe_output_len(seq.num_output_tokens)

    # -- the step --------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        self.image_budget.reset()
        scheduled: list[SeqStep] = []
        scheduled_ids: set[str] = set()
        preempted: list[Seq] = []
        self.running.sort(key=lambda s: (s.arrival_time, s.index))
        decodes: list[Seq] = []
        prefills: list[Seq] = []
        for seq in self.running:
            num_uncomputed = seq.num_uncomputed_tokens
            if num_uncomputed == 0:
                if seq.num_steps_in_flight:
                    continue  # its last token comes with a step in flight, and then it finishes
                raise RuntimeError(f"{seq.seq_id}: its sampled token was neither appended nor finished")
            (decodes if num_uncomputed == 1 else prefills).append(seq)
        num_decodes = len(decodes)
        short = num_decodes - self.allocator.num_free
        if short > 0 and self.prefix_cache is not None:
            self.evict(short)  # once for every decode of the step, not once per decode
        rest = decodes + prefills
        if 0 < num_decodes <= min(budget, self.allocator.num_free):
            # Every decode gets its slot without preempting anyone: one allocation for all of them.
            slots = self.allocator.allocate(num_decodes)
            assert slots is not None
            scheduled += [self.take(seq, 1, None, False, [slot]) for seq, slot in zip(decodes, slots, strict=True)]
            scheduled_ids.update(seq.seq_id for seq in decodes)
            budget -= num_decodes
            rest = prefills
        for seq in rest:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = self.image_budget.fit(seq, seq.num_computed_tokens, min(seq.num_uncomputed_tokens, budget), False)
            n = self._make_room(seq, n, scheduled_ids, preempted) if n else 0
            if n:
                scheduled.append(self.take(seq, n, None, is_new_row=False))
                scheduled_ids.add(seq.seq_id)
                budget -= n
        if not preempted:  # a step that had to preempt admits nothing new
            budget -= self.admission.admit(budget, num_decodes, scheduled)
        freed_rows, self._freed_rows = self._freed_rows, []
        return SchedulerOutput(scheduled, freed_rows, preempted, self.config.max_num_batched_tokens - budget)

    def update_after_step(self, output: SchedulerOutput) -> None:
        """The step ran: its tokens' K/V are in the pool."""
        for s in output.scheduled:
            seq = s.seq
            assert seq is not None
            if seq.status is SequenceStatus.RUNNING and seq.req_idx == s.row:
                seq.num_computed_tokens += len(s.token_ids)
                need = seq.num_prompt_tokens - 1
                if self.prefix_cache is not None and s.start_pos < need <= seq.num_computed_tokens:
                    self._cache_shared_prompt(seq, need)

    def _cache_shared_prompt(self, seq: Seq, need: int) -> None:
        """Cache the prompt (minus its last token) of a sequence whose prefill just finished, and lock
        it: siblings (n > 1) and later requests with the same prefix reuse it while it runs, not
        only once it finished. `_release` inserts the rest (the outputs) later."""
        cache = self.prefix_cache
        assert cache is not None
        ids = seq.cache_keys(need)
        num_cached_before = cache.insert(ids, seq.slots[:need])
        _, node = cache.match_prefix(ids)
        cache.lock(node)
        if seq.prefix_node is not None:
            cache.unlock(seq.prefix_node)
        seq.prefix_node = node
        if num_cached_before <= seq.num_shared_prefix:  # its own slots are the cached ones
            seq.num_shared_prefix = need

    # -- running sequences -----------------------------------------------------------------------

    def _make_room(self, seq: Seq, n: int, scheduled_ids: set[str], preempted: list[Seq]) -> int:
        """How many of `n` wanted tokens `seq` can take now (0: none), preempting newer ones."""
        while self.allocator.num_free < n:
            if self.prefix_cache is not None and self.evict(n - self.allocator.num_free) > 0:
                continue
            if n > 1 and self.allocator.num_free > 0:
                return self.allocator.num_free  # a prefill chunk shrinks before anyone is preempted
            victim = next(
                (s for s in reversed(self.running) if s is seq or s.seq_id not in scheduled_ids), seq
            )
            if victim is seq and scheduled_ids:
                return 0  # only older sequences hold what it needs and they are progressing: wait
            self._preempt(victim, preempted)
            if victim is seq:
                return 0
        return n

    def evict(self, num_slots: int) -> int:
        """Evict cached prefixes for `num_slots` slots, and at least `_evict_chunk`: each eviction
        walks the tree, so a full pool frees room for many steps' decodes at once."""
        assert self.prefix_cache is not None
        return self.prefix_cache.evict(max(num_slots, self._evict_chunk))

    def _preempt(self, seq: Seq, preempted: list[Seq]) -> None:
        self.running.remove(seq)
        seq.drop_placeholders()  # recomputed from its sampled tokens; a step in flight appends its last
        self._release(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        preempted.append(seq)

    def _release(self, seq: Seq) -> None:
        cache = self.prefix_cache
        if cache is not None:
            # tokens whose K/V are (or, for a step in flight, will be) in the pool
            k = min(seq.num_computed_tokens, len(seq.slots), seq.num_tokens)
            if k:
                cache.insert(seq.cache_keys(k), seq.slots[:k])
            if seq.prefix_node is not None:
                cache.unlock(seq.prefix_node)
                seq.prefix_node = None
        if seq.slots:
            self.allocator.free(seq.slots)
            seq.slots = []
        seq.num_shared_prefix = 0
        if seq.req_idx is not None:
            self.rows.free(seq.req_idx)
            self._freed_rows.append(seq.req_idx)
            seq.req_idx = None

    def take(
        self, seq: Seq, n: int, prefix_slots: list[int] | None, is_new_row: bool,
        out_slots: list[int] | None = None,
    ) -> SeqStep:
        """Schedule `n` tokens of `seq`, in `out_slots` (already allocated: a step's decodes take
        theirs at once) or in slots allocated here. `is_new_row`: the sequence (re)entered its row
        this step, so the step carries what the worker keeps per row."""
        start = seq.num_computed_tokens
        if len(seq.slots) != start:
            raise RuntimeError(f"{seq.seq_id}: update_after_step() was not called after the last step")
        if out_slots is None:
            out_slots = self.allocator.allocate(n)
            assert out_slots is not None, "callers make room first"
        seq.slots.extend(out_slots)
        assert seq.req_idx is not None
        self.image_budget.spend(seq, start, n, is_new_row)
        new_row = (
            NewRow(seq.params, seq.prompt_token_ids, list(seq.output_token_ids), seq.stop_token_ids, seq.images)
            if is_new_row else None
        )
        # (positional: once per sequence per step)
        return SeqStep(
            seq.req_idx, start, seq.all_token_ids[start : start + n], out_slots, start + n == seq.num_tokens,
            prefix_slots, new_row, None, seq,
        )
