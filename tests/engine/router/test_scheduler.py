from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import PromptTooLongError
from engine.router.future_usage import future_peak
from engine.router.scheduler import Scheduler
from engine.router.scheduler_config import SchedulerConfig
from engine.router.seq import Seq, SequenceStatus
from engine.router.slot_allocator import KVSlotAllocator
from tests.engine.factories import (
    FakeWorker,
    create_scheduler,
    create_sequences,
    fake_token,
    run_to_completion,
    step,
)


def expected_output(seq: Seq) -> list[int]:
    """What the fake model generates for `seq` when nothing else is going on."""
    history = list(seq.prompt_token_ids)
    for _ in range(seq.max_tokens):
        history.append(fake_token(history, seq.index))
    return history[seq.num_prompt_tokens :]


def check_invariants(sched: Scheduler) -> None:
    seqs = list(sched.running) + list(sched.waiting)
    owners: dict[int, list[Seq]] = {}
    for seq in seqs:
        assert not seq.is_finished
        for slot in seq.slots:
            owners.setdefault(slot, []).append(seq)
    # Each held slot counted once, plus the free ones, is the whole pool.
    assert len(owners) + sched.allocator.num_free == sched.config.num_slots
    for slot, holders in owners.items():
        assert sched.allocator.refcount(slot) == len(holders)
        assert len({s.request_id for s in holders}) == 1, "a slot shared by unrelated sequences"
    rows = [s.req_idx for s in sched.running]
    assert None not in rows and len(set(rows)) == len(rows) == sched.rows.num_used
    for seq in sched.running:
        assert seq.status is SequenceStatus.RUNNING and len(seq.slots) == seq.num_computed_tokens
    for seq in sched.waiting:
        assert seq.status is SequenceStatus.WAITING and seq.req_idx is None and not seq.slots


def assert_all_released(sched: Scheduler) -> None:
    assert not sched.has_unfinished
    assert sched.allocator.num_free == sched.config.num_slots
    assert sched.rows.num_free == sched.config.max_num_seqs


def test_add_rejects_what_can_never_fit() -> None:
    sched = create_scheduler(num_slots=100, max_model_len=80)
    with pytest.raises(PromptTooLongError):
        sched.add(create_sequences(1, prompt_len=70, max_tokens=11)[0])
    sched = create_scheduler(num_slots=50, max_model_len=80)
    with pytest.raises(ValueError, match="KV cache"):
        sched.add(create_sequences(1, prompt_len=40, max_tokens=11)[0])
    assert not sched.has_unfinished


def test_continuous_batching_requests_join_and_leave_every_step() -> None:
    sched, worker = create_scheduler(), FakeWorker(4096)
    a, b, c = create_sequences(3, prompt_len=4, max_tokens=[2, 3, 2])
    sched.add(a)
    ids = [[s.seq.seq_id for s in step(sched, worker).scheduled]]
    sched.add(b)
    ids.append([s.seq.seq_id for s in step(sched, worker).scheduled])  # a decodes, b prefills
    sched.add(c)
    ids.append([s.seq.seq_id for s in step(sched, worker).scheduled])  # b decodes, c prefills; a is gone
    ids.append([s.seq.seq_id for s in step(sched, worker).scheduled])
    assert ids == [["req0#0"], ["req0#0", "req1#0"], ["req1#0", "req2#0"], ["req1#0", "req2#0"]]
    assert a.output_token_ids == expected_output(a) and a.status is SequenceStatus.FINISHED_LENGTH
    run_to_completion(sched, worker)
    assert b.output_token_ids == expected_output(b) and c.output_token_ids == expected_output(c)
    assert_all_released(sched)


def test_chunked_prefill_respects_the_token_budget() -> None:
    sched, worker = create_scheduler(max_num_batched_tokens=32), FakeWorker(4096)
    (seq,) = create_sequences(1, prompt_len=100, max_tokens=2)
    sched.add(seq)
    chunks = []
    for _ in range(4):
        out = step(sched, worker)
        assert out.num_batched_tokens <= 32
        (s,) = out.scheduled
        chunks.append((s.start_pos, len(s.token_ids), s.sample, (s.new_row is not None)))
    assert chunks == [(0, 32, False, True), (32, 32, False, False), (64, 32, False, False), (96, 4, True, False)]
    assert seq.num_output_tokens == 1


def test_decodes_go_first_then_prefill_chunks() -> None:
    sched, worker = create_scheduler(max_num_batched_tokens=16), FakeWorker(4096)
    a, b, c = create_sequences(3, prompt_len=[4, 40, 40], max_tokens=10)
    sched.add(a)
    step(sched, worker)
    sched.add(b)
    sched.add(c)
    out = step(sched, worker)
    assert [(s.seq.seq_id, len(s.token_ids)) for s in out.scheduled] == [("req0#0", 1), ("req1#0", 15)]
    out = step(sched, worker)  # b, older, continues before c starts
    assert [(s.seq.seq_id, len(s.token_ids)) for s in out.scheduled] == [("req0#0", 1), ("req1#0", 15)]
    out = step(sched, worker)
    assert [(s.seq.seq_id, len(s.token_ids)) for s in out.scheduled] == [
        ("req0#0", 1), ("req1#0", 10), ("req2#0", 5)
    ]


def test_fcfs_a_later_small_request_does_not_pass_a_blocked_one() -> None:
    sched, worker = create_scheduler(num_slots=80, max_num_seqs=4), FakeWorker(80)
    big_running, big_waiting, small = create_sequences(3, prompt_len=[50, 50, 2], max_tokens=[20, 20, 2])
    sched.add(big_running)
    step(sched, worker)
    sched.add(big_waiting)
    sched.add(small)
    out = step(sched, worker)
    # req0: 51 known tokens, 18 to go; req1: 50 and 19: peak max(19 + 50, 18 * 2 + 101) = 137 > 80.
    # The small one would fit (3 slots) but arrived later.
    assert [s.seq.seq_id for s in out.scheduled] == ["req0#0"]
    assert list(sched.waiting) == [big_waiting, small]
    run_to_completion(sched, worker)
    assert big_waiting.output_token_ids == expected_output(big_waiting)
    assert_all_released(sched)


def test_max_num_seqs_caps_running_sequences() -> None:
    sched, worker = create_scheduler(max_num_seqs=2), FakeWorker(4096)
    seqs = create_sequences(3, prompt_len=3, max_tokens=3)
    for seq in seqs:
        sched.add(seq)
    step(sched, worker)
    assert sched.num_running == 2 and sched.num_waiting == 1
    run_to_completion(sched, worker)
    assert all(s.output_token_ids == expected_output(s) for s in seqs)


def test_future_peak_by_hand() -> None:
    # Sorted by remaining: (10, 5) (4, 20) (2, 3) -> 10*1+5=15, 4*2+25=33, 2*3+28=34.
    assert future_peak([(4, 20), (2, 3), (10, 5)]) == 34
    assert future_peak([]) == 0


@pytest.mark.parametrize(("num_slots", "admitted"), [(99, True), (98, False)])
def test_future_usage_check_admits_and_refuses(num_slots: int, admitted: bool) -> None:
    sched, worker = create_scheduler(num_slots=num_slots), FakeWorker(num_slots)
    a, b = create_sequences(2, prompt_len=10, max_tokens=41)  # each holds at most 10 + 41 - 1 = 50
    sched.add(a)
    step(sched, worker)  # a computed its prompt and sampled one token
    sched.add(b)
    out = step(sched, worker)
    # At b's admission a has 11 known tokens (used) and 50 - 11 = 39 to go; b has 10 and 40.
    # Sorted by remaining: b (40, 10), a (39, 11): peak = max(40 * 1 + 10, 39 * 2 + 10 + 11) = 99.
    assert (b in sched.running) is admitted
    assert len(out.scheduled) == (2 if admitted else 1)


def test_n_siblings_share_the_prompt_and_compute_only_its_last_token() -> None:
    sched, worker = create_scheduler(), FakeWorker(4096)
    s0, s1, s2 = create_sequences(1, prompt_len=20, max_tokens=5, n=3)
    for seq in (s0, s1, s2):
        sched.add(seq)
    out = step(sched, worker)
    assert [(s.seq, s.start_pos, len(s.token_ids)) for s in out.scheduled] == [(s0, 0, 20)]
    out = step(sched, worker)
    assert [(s.seq, s.start_pos, len(s.token_ids)) for s in out.scheduled] == [(s0, 20, 1), (s1, 19, 1), (s2, 19, 1)]
    for s in out.scheduled[1:]:
        assert s.new_row is not None and s.sample and s.token_ids == [s0.prompt_token_ids[-1]]
        assert s.prefix_slots == s0.slots[:19]
    assert all(sched.allocator.refcount(slot) == 3 for slot in s0.slots[:19])
    assert sched.allocator.num_used == 20 + 1 + 2  # one prompt, s0's decode, two last prompt tokens
    check_invariants(sched)
    run_to_completion(sched, worker)
    assert [s.output_token_ids for s in (s0, s1, s2)] == [expected_output(s) for s in (s0, s1, s2)]
    assert len({tuple(s.output_token_ids) for s in (s0, s1, s2)}) == 3
    assert_all_released(sched)


def test_siblings_join_as_soon_as_the_shared_part_is_computed() -> None:
    sched, worker = create_scheduler(max_num_batched_tokens=19), FakeWorker(4096)
    s0, s1 = create_sequences(1, prompt_len=20, max_tokens=3, n=2)
    sched.add(s0)
    sched.add(s1)
    step(sched, worker)  # s0 computes 19 of 20 prompt tokens
    out = step(sched, worker)
    assert [(s.seq, s.start_pos, len(s.token_ids), s.sample) for s in out.scheduled] == [
        (s0, 19, 1, True), (s1, 19, 1, True)
    ]
    run_to_completion(sched, worker)
    assert s1.output_token_ids == expected_output(s1)


def test_abort_frees_slots_and_rows_at_once() -> None:
    sched, worker = create_scheduler(num_slots=200, max_num_seqs=4), FakeWorker(200)
    r0 = create_sequences(1, prompt_len=30, max_tokens=20, n=2, prefix="a")
    r1 = create_sequences(1, prompt_len=30, max_tokens=20)
    for seq in r0 + r1:
        sched.add(seq)
    step(sched, worker)
    step(sched, worker)
    assert all(s.status is SequenceStatus.RUNNING for s in r0 + r1)
    rows = {s.req_idx for s in r0}
    aborted = sched.abort("a0")
    assert aborted == r0 and all(s.status is SequenceStatus.FINISHED_ABORTED for s in r0)
    assert sched.allocator.num_used == len(r1[0].slots) and sched.num_running == 1
    check_invariants(sched)
    out = step(sched, worker)
    assert set(out.freed_rows) == rows
    assert sched.abort("a0") == [] and sched.abort("nobody") == []


def test_abort_of_a_waiting_request_and_while_its_step_runs() -> None:
    sched, worker = create_scheduler(max_num_seqs=1), FakeWorker(4096)
    a, b = create_sequences(2, prompt_len=8, max_tokens=4)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert sched.abort("req1") == [b] and not sched.waiting
    assert sched.abort("req0") == [a]  # after schedule(), before the step's results
    worker.execute(out)
    sched.update_after_step(out)
    sched.finish(a, SequenceStatus.FINISHED_LENGTH)  # a late finish is a no-op
    assert a.status is SequenceStatus.FINISHED_ABORTED
    assert_all_released(sched)


def test_preempted_sequence_keeps_its_output_and_goes_to_the_front() -> None:
    sched = create_scheduler(num_slots=24, admission="aggressive", initial_output_len=1)
    worker = FakeWorker(24)
    a, b, c = create_sequences(3, prompt_len=8, max_tokens=12)
    for seq in (a, b, c):
        sched.add(seq)
    preempted: list[Seq] = []
    while not preempted:
        rows_before = {s.seq_id: s.req_idx for s in sched.running}
        out = step(sched, worker)
        preempted = out.preempted
        check_invariants(sched)
    (victim,) = preempted
    assert victim is not a and victim.num_computed_tokens == 0 and victim.num_output_tokens > 0
    assert sched.waiting[0] is victim and victim.num_preemptions == 1
    assert rows_before[victim.seq_id] in out.freed_rows
    assert not any(s.new_row is not None for s in out.scheduled)  # a step that preempts admits nothing
    back = None
    while back is None:
        back = next((s for s in step(sched, worker).scheduled if s.seq is victim), None)
    # It recomputes prompt + output from position 0 in a fresh row.
    assert back.new_row is not None and back.start_pos == 0 and back.token_ids == victim.all_token_ids[: len(back.token_ids)]
    # The worker's new row gets the output it keeps (its sampling state counts those tokens).
    kept = back.new_row.output_token_ids
    assert kept and kept == victim.output_token_ids[: len(kept)] and back.new_row.prompt_token_ids == victim.prompt_token_ids
    run_to_completion(sched, worker)
    assert [s.output_token_ids for s in (a, b, c)] == [expected_output(s) for s in (a, b, c)]
    assert_all_released(sched)


def test_waiting_sequences_never_preempt_running_ones() -> None:
    sched, worker = create_scheduler(num_slots=64, admission="aggressive", initial_output_len=1), FakeWorker(64)
    a, b = create_sequences(2, prompt_len=30, max_tokens=30)
    sched.add(a)
    step(sched, worker)
    sched.add(b)
    for _ in range(40):
        out = step(sched, worker)
        assert a not in out.preempted
    assert a.output_token_ids == expected_output(a)


def _pressure_workload() -> list[Seq]:
    prompts = [30 + (7 * i) % 50 for i in range(24)]
    outputs = [40 + (11 * i) % 50 for i in range(24)]
    seqs = create_sequences(24, prompt_len=prompts, max_tokens=outputs)
    seqs += create_sequences(4, prompt_len=25, max_tokens=40, n=2, start_time=24.0, prefix="n")
    return seqs  # 32 sequences, about ten times a 300-slot pool


@pytest.mark.parametrize("admission", ["conservative", "aggressive"])
def test_memory_pressure_finishes_everything_like_an_unpressured_run(admission: str) -> None:
    relaxed, relaxed_worker = create_scheduler(num_slots=1 << 14, max_num_seqs=32), FakeWorker(1 << 14)
    unpressured = _pressure_workload()
    for seq in unpressured:
        relaxed.add(seq)
    run_to_completion(relaxed, relaxed_worker)

    sched = create_scheduler(
        num_slots=300, max_num_seqs=32, max_num_batched_tokens=64, admission=admission, initial_output_len=8  # type: ignore[arg-type]
    )
    worker = FakeWorker(300)
    seqs = _pressure_workload()
    assert sum(s.num_prompt_tokens + s.max_tokens for s in seqs) > 10 * 300
    for seq in seqs:
        sched.add(seq)
    num_steps = 0
    while sched.has_unfinished:
        step(sched, worker)
        check_invariants(sched)
        num_steps += 1
        assert num_steps < 20_000
    for seq, ref in zip(seqs, unpressured, strict=True):
        assert seq.status is SequenceStatus.FINISHED_LENGTH and seq.num_output_tokens == seq.max_tokens
        assert seq.output_token_ids == ref.output_token_ids == expected_output(seq)
    if admission == "aggressive":
        assert sched.num_preemptions > 0
    assert_all_released(sched)


_op = st.one_of(
    st.tuples(st.just("add"), st.integers(1, 40), st.integers(1, 30), st.integers(1, 3)),
    st.tuples(st.just("abort"), st.integers(0, 30)),
    st.tuples(st.just("abort_while_running"), st.integers(0, 30)),
    st.tuples(st.just("step"), st.integers(1, 4)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_slots=st.integers(72, 256),
    max_num_seqs=st.integers(1, 8),
    budget=st.integers(1, 64),
    aggressive=st.booleans(),
    ops=st.lists(_op, min_size=1, max_size=60),
)
def test_random_add_abort_step_keeps_invariants(
    num_slots: int, max_num_seqs: int, budget: int, aggressive: bool, ops: list[tuple[object, ...]]
) -> None:
    sched = create_scheduler(
        num_slots=num_slots, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
        admission="aggressive" if aggressive else "conservative", initial_output_len=2,
    )
    worker = FakeWorker(num_slots)
    added: list[Seq] = []
    num_requests = 0
    for op in ops:
        if op[0] == "add":
            _, prompt_len, max_tokens, n = op
            new = create_sequences(
                1, prompt_len=int(prompt_len), max_tokens=int(max_tokens), n=int(n), prefix=f"r{num_requests}-"
            )
            num_requests += 1
            for seq in new:
                sched.add(seq)
            added += new
        elif op[0] in ("abort", "abort_while_running") and num_requests:
            request_id = f"r{int(op[1]) % num_requests}-0"
            if op[0] == "abort":
                sched.abort(request_id)
            else:
                step(sched, worker, abort_while_running=request_id)
            assert all(s.is_finished for s in added if s.request_id == request_id)
        else:
            for _ in range(int(op[1])):
                step(sched, worker)
                check_invariants(sched)
        check_invariants(sched)
    run_to_completion(sched, worker)
    for seq in added:
        if seq.status is SequenceStatus.FINISHED_LENGTH:
            assert seq.output_token_ids == expected_output(seq)
        else:
            assert seq.status is SequenceStatus.FINISHED_ABORTED
    assert_all_released(sched)


def test_admission_batch_groups_prompts_while_a_large_batch_is_full() -> None:
    # 40 rows, all busy with sequences finishing one per step; 60 more waiting. With
    # admission_batch 4, newcomers join in groups of at least 4 (or after 8 steps of waiting),
    # so their prompts share passes; with 1, one joins whenever a row frees.
    def run(admission_batch: int) -> tuple[list[int], list[Seq]]:
        config = SchedulerConfig(max_num_seqs=40, max_num_batched_tokens=4096, max_model_len=2048,
                                 num_slots=20_000, admission_batch=admission_batch)
        sched = Scheduler(config, KVSlotAllocator(config.num_slots))
        seqs = create_sequences(100, prompt_len=16, max_tokens=[20 + r for r in range(100)])
        for seq in seqs:
            sched.add(seq)
        worker = FakeWorker(config.num_slots)
        joined, held = [], 0
        while sched.has_unfinished:
            could_join = sched.rows.num_free > 0 and sched.num_waiting > 0
            out = step(sched, worker)
            joined.append(sum(1 for s in out.scheduled if s.new_row is not None))
            held = held + 1 if could_join and not joined[-1] else 0
            assert held <= 8  # nobody is held back past 8 steps while a row is free
        return joined, seqs

    one_by_one, seqs_1 = run(1)
    batched, seqs_4 = run(4)
    assert [s.output_token_ids for s in seqs_4] == [s.output_token_ids for s in seqs_1]
    assert one_by_one[0] == batched[0] == 40  # the first batch fills every row at once
    steady = [n for n in batched[1:] if n]
    assert steady and min(steady[:-1]) >= 4  # groups of 4 (the last group takes what is left)
    assert max(n for n in one_by_one[1:]) == 1  # without it: one at a time
