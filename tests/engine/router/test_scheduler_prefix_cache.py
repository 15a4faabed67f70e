"""The router with the radix prefix cache on, over the fake worker (which checks every KV history)."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.router.scheduler import Scheduler
from engine.router.seq import Seq, SequenceStatus
from engine.sampling_params import SamplingParams
from tests.engine.factories import FakeWorker, create_scheduler, fake_token, run_to_completion, step

SYSTEM_PROMPTS = [[7, 8, 9, 10, 11, 12, 13, 14], [7, 8, 9, 20, 21], [30, 31, 32, 33, 34, 35]]


def make_request(request_id: str, prompt: list[int], max_tokens: int, n: int = 1, arrival: float = 0.0) -> list[Seq]:
    params = SamplingParams(n=n, max_tokens=max_tokens)
    return [
        Seq(request_id, f"{request_id}#{i}", i, prompt, params, max_tokens, arrival_time=arrival)
        for i in range(n)
    ]


def expected_output(seq: Seq) -> list[int]:
    history = list(seq.prompt_token_ids)
    for _ in range(seq.max_tokens):
        history.append(fake_token(history, seq.index))
    return history[seq.num_prompt_tokens :]


def check_invariants(sched: Scheduler) -> None:
    cache = sched.prefix_cache
    assert cache is not None
    counts = [0] * sched.config.num_slots
    for slot in cache.cached_prefixes().values():
        counts[slot] += 1
    for seq in sched.running:
        assert seq.status is SequenceStatus.RUNNING and len(seq.slots) == seq.num_computed_tokens
        for slot in seq.slots:
            counts[slot] += 1
    for seq in sched.waiting:
        assert seq.req_idx is None and not seq.slots and seq.prefix_node is None
    assert [sched.allocator.refcount(s) for s in range(sched.config.num_slots)] == counts
    assert sched.allocator.num_free == counts.count(0)
    # What the cache calls evictable is referenced by the cache alone, so evicting it frees it.
    assert cache.num_evictable_tokens <= sum(1 for c in counts if c == 1)
    assert 0 <= sched.kv_usage <= 1


def assert_all_released(sched: Scheduler) -> None:
    assert not sched.has_unfinished and sched.kv_usage == 0
    sched.reset_prefix_cache()
    assert sched.allocator.num_free == sched.config.num_slots
    assert sched.rows.num_free == sched.config.max_num_seqs


def test_second_identical_request_starts_from_the_cache() -> None:
    sched = create_scheduler(num_slots=200, enable_prefix_caching=True)
    worker = FakeWorker(200)
    prompt = list(range(1, 31))
    first = make_request("a", prompt, 5)[0]
    sched.add(first)
    run_to_completion(sched, worker)
    assert first.num_prefix_cache_hit == 0 and sched.prefix_cache_hits == 0
    second = make_request("b", prompt, 5)[0]
    sched.add(second)
    out = sched.schedule()
    assert [len(s.token_ids) for s in out.scheduled] == [1] and len(out.scheduled[0].prefix_slots or []) == 29
    worker.execute(out)
    sched.update_after_step(out)
    second.append_token(fake_token(second.all_token_ids, 0))
    assert second.num_prefix_cache_hit == 29 and sched.prefix_cache_hits == 29 and sched.prefix_cache_queries == 60
    run_to_completion(sched, worker)
    assert second.output_token_ids == first.output_token_ids == expected_output(first)
    assert_all_released(sched)


def test_siblings_share_the_prompt_through_the_cache() -> None:
    sched = create_scheduler(num_slots=200, max_num_batched_tokens=8, enable_prefix_caching=True)
    worker = FakeWorker(200)
    seqs = make_request("n", list(range(1, 21)), 6, n=3)
    for seq in seqs:
        sched.add(seq)
    computed = 0
    while sched.has_unfinished:
        out = step(sched, worker)
        computed += out.num_batched_tokens
        check_invariants(sched)
    assert computed == 20 + 2 * 1 + 3 * 5  # the prompt once, its last token per sibling, then decodes
    for seq in seqs:
        assert seq.output_token_ids == expected_output(seq)
    assert_all_released(sched)


_op = st.one_of(
    st.tuples(st.just("add"), st.integers(0, 3), st.integers(0, 12), st.integers(1, 25), st.integers(1, 3)),
    st.tuples(st.just("abort"), st.integers(0, 30)),
    st.tuples(st.just("abort_while_running"), st.integers(0, 30)),
    st.tuples(st.just("step"), st.integers(1, 4)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_slots=st.integers(64, 200),
    max_num_seqs=st.integers(1, 8),
    budget=st.integers(1, 48),
    aggressive=st.booleans(),
    seed=st.integers(0, 1000),
    ops=st.lists(_op, min_size=1, max_size=50),
)
def test_random_workload_with_shared_prefixes_keeps_invariants(
    num_slots: int, max_num_seqs: int, budget: int, aggressive: bool, seed: int, ops: list[tuple[object, ...]]
) -> None:
    sched = create_scheduler(
        num_slots=num_slots, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
        admission="aggressive" if aggressive else "conservative", initial_output_len=2,
        enable_prefix_caching=True,
    )
    worker = FakeWorker(num_slots)
    rng = random.Random(seed)
    added: list[Seq] = []
    num_requests = 0
    for op in ops:
        if op[0] == "add":
            _, system, tail_len, max_tokens, n = op
            prompt = (SYSTEM_PROMPTS[int(system)] if int(system) < 3 else []) + [
                rng.randrange(1, 6) for _ in range(int(tail_len))
            ]
            if not prompt:
                prompt = [1]
            new = make_request(f"r{num_requests}", prompt, int(max_tokens), int(n), arrival=float(num_requests))
            num_requests += 1
            for seq in new:
                sched.add(seq)
            added += new
        elif op[0] in ("abort", "abort_while_running") and num_requests:
            request_id = f"r{int(op[1]) % num_requests}"
            if op[0] == "abort":
                sched.abort(request_id)
            else:
                step(sched, worker, abort_while_running=request_id)
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


def test_a_full_pool_evicts_once_per_step_not_once_per_decode() -> None:
    # 40 finished requests fill a 2048-slot pool with cached prefixes; then 32 new ones decode.
    # Eviction walks the whole tree, so the decodes of a step share one eviction (of at least
    # 1/256 of the pool) instead of evicting once per decode.
    sched = create_scheduler(num_slots=2048, max_num_seqs=64, max_num_batched_tokens=4096,
                             enable_prefix_caching=True)
    worker = FakeWorker(2048)
    rng = random.Random(3)
    for i in range(40):
        for seq in make_request(f"old{i}", [rng.randrange(100, 10_000) for _ in range(40)], max_tokens=10):
            sched.add(seq)
    run_to_completion(sched, worker)
    assert sched.allocator.num_free < 100  # the cache holds nearly the whole pool
    cache = sched.prefix_cache
    assert cache is not None
    calls = []
    evict = cache.evict
    cache.evict = lambda n: calls.append(n) or evict(n)  # type: ignore[method-assign]
    new = [make_request(f"new{i}", [rng.randrange(100, 10_000) for _ in range(8)], max_tokens=12)[0] for i in range(32)]
    for seq in new:
        sched.add(seq)
    step(sched, worker)  # admission: each prompt evicts for itself
    assert len(sched.running) == 32
    calls.clear()
    steps = 0
    while sched.has_unfinished:
        step(sched, worker)
        steps += 1
    assert all(seq.output_token_ids == expected_output(seq) for seq in new)
    # 32 decodes per step, one eviction per step at most (of at least 2048 // 256 slots)
    assert 0 < len(calls) <= steps and all(n >= 8 for n in calls)
    check_invariants(sched)
    assert_all_released(sched)
