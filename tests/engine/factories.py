"""Builders for router tests: a scheduler, sequences, and a fake worker that needs no model.

`FakeWorker` keeps a fake KV pool (slot -> the token id written there) and `req_to_token`
rows exactly as a real worker would, and "samples" a token that depends only on the history
it reads back through the row. A slot freed too early, shared with the wrong sequence or
overwritten shows up as a wrong token, so whole-run comparisons check the bookkeeping too.
"""

from __future__ import annotations

import zlib
from array import array
from typing import Literal

from engine.router.scheduler import Scheduler, SchedulerOutput
from engine.router.scheduler_config import SchedulerConfig
from engine.router.seq import Seq, SequenceStatus
from engine.router.slot_allocator import KVSlotAllocator
from engine.sampling_params import SamplingParams

VOCAB_SIZE = 32000


def create_scheduler(
    *,
    num_slots: int = 4096,
    max_num_seqs: int = 16,
    max_num_batched_tokens: int = 256,
    max_model_len: int = 2048,
    admission: Literal["conservative", "aggressive"] = "conservative",
    watermark: float = 0.0,
    initial_output_len: int = 128,
    enable_prefix_caching: bool = False,
    max_image_tokens_per_step: int | None = None,
) -> Scheduler:
    config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        num_slots=num_slots,
        admission=admission,
        watermark=watermark,
        initial_output_len=initial_output_len,
        enable_prefix_caching=enable_prefix_caching,
        max_image_tokens_per_step=max_image_tokens_per_step,
    )
    return Scheduler(config, KVSlotAllocator(num_slots))


def create_sequences(
    num_requests: int,
    *,
    prompt_len: int | list[int] = 16,
    max_tokens: int | list[int] = 8,
    n: int = 1,
    start_time: float = 0.0,
    prefix: str = "req",
) -> list[Seq]:
    """`num_requests` requests of `n` sequences each, arriving one second apart, in order."""
    seqs = []
    for r in range(num_requests):
        p_len = prompt_len[r] if isinstance(prompt_len, list) else prompt_len
        m_tok = max_tokens[r] if isinstance(max_tokens, list) else max_tokens
        prompt = [(r * 131 + p * 7 + 1) % VOCAB_SIZE for p in range(p_len)]
        params = SamplingParams(n=n, max_tokens=m_tok)
        for i in range(n):
            seqs.append(
                Seq(
                    request_id=f"{prefix}{r}",
                    seq_id=f"{prefix}{r}#{i}",
                    index=i,
                    prompt_token_ids=prompt,
                    params=params,
                    max_tokens=m_tok,
                    arrival_time=start_time + r,
                )
            )
    return seqs


def fake_token(history: list[int], index: int) -> int:
    """The deterministic "model": the next token of a choice depends only on what precedes it."""
    return zlib.crc32(array("q", [index, *history]).tobytes()) % VOCAB_SIZE


class FakeWorker:
    """Applies `SchedulerOutput`s to a fake KV pool and `req_to_token`, and samples tokens."""

    def __init__(self, num_slots: int) -> None:
        self.kv: list[int | None] = [None] * num_slots
        self.rows: dict[int, list[int]] = {}  # row -> slot of each position written so far

    def execute(self, out: SchedulerOutput) -> list[int]:
        """One token id per scheduled entry with sample=True, in order."""
        for row in out.freed_rows:
            self.rows.pop(row, None)
        sampled = []
        for s in out.scheduled:
            assert s.seq is not None
            if s.new_row is not None:
                assert s.row not in self.rows, "a new row must have been freed first"
                assert s.seq.is_finished or (s.prefix_slots or []) == s.seq.slots[: s.start_pos]
                self.rows[s.row] = list(s.prefix_slots or [])
            row = self.rows[s.row]
            assert len(row) == s.start_pos and len(s.out_slots) == len(s.token_ids)
            for slot, token_id in zip(s.out_slots, s.token_ids, strict=True):
                self.kv[slot] = token_id
            row.extend(s.out_slots)
        for s in out.scheduled:  # attention reads after every write of the step
            if s.sample:
                assert s.seq is not None
                history = [self.kv[slot] for slot in self.rows[s.row]]
                assert history == s.seq.all_token_ids, f"{s.seq.seq_id} read a corrupted KV history"
                sampled.append(fake_token(history, s.seq.index))
        return sampled


def step(scheduler: Scheduler, worker: FakeWorker, abort_while_running: str | None = None) -> SchedulerOutput:
    """One engine step: schedule, execute, update, append sampled tokens, finish at max_tokens.

    `abort_while_running`: a request id to abort after scheduling, while the step "runs".
    """
    out = scheduler.schedule()
    if abort_while_running is not None:
        scheduler.abort(abort_while_running)
    sampled = worker.execute(out)
    scheduler.update_after_step(out)
    for s, token_id in zip((s for s in out.scheduled if s.sample), sampled, strict=True):
        seq = s.seq
        assert seq is not None
        if seq.is_finished:
            continue
        seq.append_token(token_id)
        if seq.num_output_tokens >= seq.max_tokens:
            scheduler.finish(seq, SequenceStatus.FINISHED_LENGTH)
    return out


def run_to_completion(scheduler: Scheduler, worker: FakeWorker, max_steps: int = 100_000) -> int:
    """Step until nothing is left; returns the number of steps."""
    for num_steps in range(1, max_steps + 1):
        step(scheduler, worker)
        if not scheduler.has_unfinished:
            return num_steps
    raise AssertionError(f"still unfinished after {max_steps} steps")
