"""Admission: which waiting sequences join the running batch, at the end of a step's plan.

Waiting sequences are admitted first come first served while a `req_to_token` row, slots, the
step's token budget, its image budget (engine/router/image_budget.py) and the future-usage check
allow (a prompt larger than the budget left gets a chunk; one that reaches an image past the
image budget, a chunk up to that image). With `admission_batch` > 1, a full batch of at least 32 decodes admits only once that
many rows are free (or after 8 steps), so prompts are computed in fewer, larger passes. A step
that had to preempt admits nothing, and admission never preempts.

The future-usage check (LightLLM's, `engine/router/future_usage.py`): for the running sequences
plus the candidate, let `used_i` be its known tokens (held slots plus the prompt or recompute
still to come: chunked prefill computes those far faster than one per step) and `remaining_i`
the tokens it may still generate. Sorted by `remaining` descending, sequence i finishes no
earlier than those before it, so when it does the pool holds at most
`remaining_i * (i + 1) + sum(used_j for j <= i)`. The candidate is admitted when the maximum
over i fits `num_slots` (minus the watermark). Conservative mode predicts `max_tokens` for every
sequence; aggressive mode a running average of observed output lengths, capped by
`max_tokens`, with preemption as the safety valve.

Shared prompts: sibling i > 0 of an `n > 1` request waits while sibling 0 is unfinished and
has not computed the prompt, then starts from sibling 0's slots of the prompt minus its last
token. With the prefix cache on, every sequence starts from the longest cached prefix of its
tokens but the last instead (it locks that path and takes references on its slots), and
unlocked cached prefixes count as free.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Protocol

from engine.router.future_usage import FutureUsage
from engine.router.image_budget import ImageBudget
from engine.router.prefix_cache import RadixPrefixCache
from engine.router.scheduler_config import SchedulerConfig
from engine.router.seq import Seq, SequenceStatus
from engine.router.slot_allocator import KVSlotAllocator, ReqRowAllocator

if TYPE_CHECKING:
    from engine.messages import SeqStep

_MIN_DECODES_TO_BATCH_ADMISSION = 32  # below this, admission never waits (latency first)
_MAX_ADMISSION_WAIT = 8  # steps a waiting request can be held back for `admission_batch`
_OUTPUT_LEN_EMA = 0.1  # weight of the newest observation in the aggressive output-length average


class Router(Protocol):
    """What admission uses of its scheduler (`engine.router.scheduler.Scheduler`)."""

    config: SchedulerConfig
    allocator: KVSlotAllocator
    rows: ReqRowAllocator
    prefix_cache: RadixPrefixCache | None
    waiting: deque[Seq]
    running: list[Seq]
    image_budget: ImageBudget

    def take(
        self, seq: Seq, n: int, prefix_slots: list[int] | None, is_new_row: bool,
        out_slots: list[int] | None = None,
    ) -> SeqStep: ...

    def evict(self, num_slots: int) -> int: ...

    def siblings(self, request_id: str) -> list[Seq]: ...


class Admission:
    """The admission decisions of one `Scheduler`, and what they remember: the observed output
    lengths (aggressive mode), the steps held back for `admission_batch`, the prefix-cache hit
    counts. The scheduler owns the queues, rows and slots; admission moves sequences from its
    waiting queue into its running list and schedules their first chunk (`Scheduler.take`)."""

    def __init__(self, scheduler: Router) -> None:
        self._sched = scheduler
        config = scheduler.config
        self._config = config
        self._slot_limit = config.num_slots - int(config.watermark * config.num_slots)
        self._avg_output_len: float | None = None
        self._steps_held_back = 0  # steps admission waited for `admission_batch` rows
        self.prefix_cache_queries = 0  # tokens of admitted sequences looked up in the cache
        self.prefix_cache_hits = 0  # of those, tokens found

    def observe_output_len(self, num_output_tokens: int) -> None:
        """A sequence finished on its own (stop or length) after this many output tokens."""
        avg = self._avg_output_len
        n = num_output_tokens
        self._avg_output_len = n if avg is None else avg + _OUTPUT_LEN_EMA * (n - avg)

    def admit(self, budget: int, num_decodes: int, scheduled: list[SeqStep]) -> int:
        """Admit waiting sequences into this step (appended to `scheduled`) unless admission
        waits for `admission_batch` rows; returns the tokens scheduled for them."""
        sched = self._sched
        if not self._due(num_decodes):
            if sched.waiting and sched.rows.num_free:
                self._steps_held_back += 1
            return 0
        self._steps_held_back = 0
        return self._admit(budget, scheduled)

    def _due(self, num_decodes: int) -> bool:
        """Admit this step? Always, unless a large running batch is full and only a few rows are
        free (`admission_batch`): then the waiting prompts are batched over a few steps, bounded
        by `_MAX_ADMISSION_WAIT`."""
        return (
            self._sched.rows.num_free >= min(self._config.admission_batch, len(self._sched.waiting))
            or num_decodes < _MIN_DECODES_TO_BATCH_ADMISSION
            or self._steps_held_back >= _MAX_ADMISSION_WAIT
        )

    def _admit(self, budget: int, scheduled: list[SeqStep]) -> int:
        """Admit waiting sequences in FCFS order; returns the tokens scheduled for them."""
        sched = self._sched
        if not (sched.waiting and budget > 0 and sched.rows.num_free):
            return 0
        used_budget = 0
        skipped: list[Seq] = []
        usage = FutureUsage(shared_prefixes=sched.prefix_cache is None)  # what runs, for _fits
        for seq in sched.running:
            self._add_usage(usage, seq, seq.num_shared_prefix)
        while sched.waiting and used_budget < budget and sched.rows.num_free:
            seq = sched.waiting[0]
            donor = self._prefix_donor(seq)
            if donor is None and self._waits_for_sibling(seq):
                skipped.append(sched.waiting.popleft())  # not ready yet; later requests may pass
                continue
            if sched.prefix_cache is not None:
                n = self._admit_cached(seq, budget - used_budget, usage, scheduled)
                if not n:
                    break
                used_budget += n
                continue
            num_shared = seq.num_prompt_tokens - 1 if donor is not None else 0
            n = min(seq.num_tokens - num_shared, budget - used_budget, sched.allocator.num_free)
            n = sched.image_budget.fit(seq, num_shared, n, True) if n > 0 else n
            if n <= 0 or not self._fits(seq, num_shared, usage):
                break
            sched.waiting.popleft()
            seq.req_idx = sched.rows.allocate()
            seq.status = SequenceStatus.RUNNING
            prefix_slots = None
            if donor is not None:
                seq.slots = donor.slots[:num_shared]
                sched.allocator.incref(seq.slots)
                seq.num_computed_tokens = seq.num_shared_prefix = num_shared
                donor.num_shared_prefix = num_shared
                prefix_slots = list(seq.slots)
            sched.running.append(seq)
            scheduled.append(sched.take(seq, n, prefix_slots, is_new_row=True))
            used_budget += n
        sched.waiting.extendleft(reversed(skipped))
        return used_budget

    def _admit_cached(self, seq: Seq, budget: int, usage: FutureUsage, scheduled: list[SeqStep]) -> int:
        """Admit the head of the waiting queue starting from its longest cached prefix; returns the
        tokens scheduled for it (0: not admitted, nothing changed but the cache's LRU order)."""
        sched = self._sched
        cache = sched.prefix_cache
        assert cache is not None
        slots: list[int] = []
        node = cache.root
        if seq.params.prompt_logprobs is None:  # prompt logprobs need every prompt position computed
            slots, node = cache.match_prefix(seq.cache_keys(seq.num_tokens - 1))
        cache.lock(node)  # before counting what eviction could free: the match itself must stay
        m = len(slots)
        n = min(seq.num_tokens - m, budget, sched.allocator.num_free + cache.num_evictable_tokens)
        n = sched.image_budget.fit(seq, m, n, True) if n > 0 else n
        locked = cache.num_cached_tokens - cache.num_evictable_tokens
        if n <= 0 or not self._fits(seq, m, usage, self._slot_limit - locked):
            cache.unlock(node)
            return 0
        if sched.allocator.num_free < n:
            sched.evict(n - sched.allocator.num_free)
            n = min(n, sched.allocator.num_free)
            if n == 0:
                cache.unlock(node)
                return 0
        sched.waiting.popleft()
        seq.req_idx = sched.rows.allocate()
        seq.status = SequenceStatus.RUNNING
        sched.allocator.incref(slots)
        seq.slots = list(slots)
        seq.num_computed_tokens = seq.num_shared_prefix = m
        seq.prefix_node = node
        if seq.num_prefix_cache_hit is None:
            seq.num_prefix_cache_hit = m
        self.prefix_cache_queries += seq.num_tokens
        self.prefix_cache_hits += m
        sched.running.append(seq)
        scheduled.append(sched.take(seq, n, list(slots) if m else None, is_new_row=True))
        return n

    def _prefix_donor(self, seq: Seq) -> Seq | None:
        """A running sibling whose computed slots cover the prompt minus its last token."""
        need = seq.num_prompt_tokens - 1
        if need <= 0:
            return None
        for sib in self._sched.siblings(seq.request_id):
            if sib is not seq and sib.status is SequenceStatus.RUNNING and sib.num_computed_tokens >= need:
                return sib
        return None

    def _waits_for_sibling(self, seq: Seq) -> bool:
        """Sibling i > 0 waits while sibling 0 is unfinished: it will compute the shared prompt."""
        if seq.index == 0 or seq.num_prompt_tokens <= 1:
            return False
        return any(s.index == 0 for s in self._sched.siblings(seq.request_id))

    def _predicted_slots(self, seq: Seq) -> int:
        """Slots `seq` holds at its predicted end."""
        if self._config.admission == "conservative":
            return seq.max_num_slots
        avg = self._avg_output_len
        predicted = self._config.initial_output_len if avg is None else round(avg)
        output_len = min(seq.max_tokens, max(predicted, seq.num_output_tokens + 1))
        return seq.num_prompt_tokens + output_len - 1

    def _add_usage(self, usage: FutureUsage, seq: Seq, prefix: int) -> None:
        """Add `seq` to the future-usage model. Known tokens not computed yet (a prompt, or prompt
        + output after preemption) count as used: chunked prefill computes them many per step,
        far faster than the one token per step the check assumes for what is still to be
        generated."""
        usage.add(seq.request_id, max(self._predicted_slots(seq) - seq.num_tokens, 0), seq.num_tokens, prefix)

    def _fits(self, candidate: Seq, num_shared: int, usage: FutureUsage, limit: int | None = None) -> bool:
        """The future-usage check for what runs plus `candidate`, which joins `usage` (the caller
        stops admitting on False, so a refused candidate is never taken back out). With the
        prefix cache, locked cached prefixes are left out of `usage` and out of `limit`."""
        alone = not self._sched.running  # alone it always fits (checked in add): nothing can starve
        self._add_usage(usage, candidate, num_shared)
        limit = self._slot_limit if limit is None else limit
        return alone or usage.peak() <= limit
