"""`AsyncEngine`: streaming deltas, abort frees memory, a dead worker fails requests fast."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import signal
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from engine import (
    AsyncEngine,
    EngineConfig,
    EngineDeadError,
    RequestOutput,
    RequestOutputKind,
    SamplingParams,
)
from tests.engine.models.harness import save_tiny_model, tiny_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_model(str(path), tiny_config("llama"))
    return str(path)


async def _started(model_dir: str) -> AsyncEngine:
    engine = AsyncEngine(EngineConfig(model=model_dir, dtype="float32", kv_cache_memory_gb=0.01))
    await engine.start()
    return engine


# The checks of a healthy engine's streams, sinks and aborts share one engine (started once, on
# the module's event loop): each leaves it idle with every slot free, as it asserts; the checks
# that kill a worker or start one differently start their own.
_SHARED_LOOP = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(model_dir: str) -> AsyncIterator[AsyncEngine]:
    shared = await _started(model_dir)
    try:
        yield shared
    finally:
        await shared.shutdown()


@_SHARED_LOOP
async def test_delta_stream_adds_up_to_the_final_output(engine: AsyncEngine) -> None:
    prompt = [5, 9, 11, 200, 17]
    final = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, n=2, seed=1,
                           output_kind=RequestOutputKind.FINAL_ONLY)
    outs = [o async for o in engine.generate(prompt, final, "final")]
    assert len(outs) == 1 and outs[0].finished
    delta = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, n=2, seed=1,
                           output_kind=RequestOutputKind.DELTA)
    tokens: dict[int, list[int]] = {0: [], 1: []}
    finishes: dict[int, int] = {0: 0, 1: 0}
    async for out in engine.generate(prompt, delta, "delta"):
        for choice in out.outputs:
            assert len(choice.token_ids) == 1  # one token per delta while the consumer keeps up
            tokens[choice.index] += choice.token_ids
            finishes[choice.index] += choice.finish_reason is not None
    assert tokens == {c.index: c.token_ids for c in outs[0].outputs}
    assert finishes == {0: 1, 1: 1}  # each choice finishes exactly once


@_SHARED_LOOP
async def test_a_consumer_that_falls_behind_gets_the_queued_deltas_as_one(engine: AsyncEngine) -> None:
    # While a consumer is busy, its request's deltas queue up; the next one it takes carries
    # them all (text, tokens, logprobs in order; the finish once), so it catches up at once.
    prompt = [5, 9, 11, 200, 17]
    final = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, n=2, seed=1, logprobs=2,
                           output_kind=RequestOutputKind.FINAL_ONLY)
    (want,) = [o async for o in engine.generate(prompt, final, "final")]
    delta = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, n=2, seed=1, logprobs=2,
                           output_kind=RequestOutputKind.DELTA)
    got: dict[int, tuple[list[int], list, str]] = {0: ([], [], ""), 1: ([], [], "")}
    finishes = {0: 0, 1: 0}
    sizes = []
    async for out in engine.generate(prompt, delta, "slow"):
        for c in out.outputs:
            ids, lps, text = got[c.index]
            got[c.index] = (ids + c.token_ids, lps + (c.logprobs or []), text + c.text)
            finishes[c.index] += c.finish_reason is not None
        sizes.append(max(len(c.token_ids) for c in out.outputs))
        if len(sizes) == 2:  # falls behind once: until the engine has finished the request
            for _ in range(3000):
                if engine.stats().num_running == 0:
                    break
                await asyncio.sleep(0.01)
        await asyncio.sleep(0)
    for c in want.outputs:  # (the second request's prompt comes from the prefix cache)
        ids, lps, text = got[c.index]
        assert (ids, text) == (c.token_ids, c.text)
        assert [list(d) for d in lps] == [list(d) for d in c.logprobs]
        flat = [lp.logprob for d in lps for lp in d.values()]
        assert flat == pytest.approx([lp.logprob for d in c.logprobs for lp in d.values()], abs=1e-4)
    assert finishes == {0: 1, 1: 1}
    assert sizes[0] == 1 and max(sizes) > 1 and len(sizes) < 16


def test_merged_deltas_keep_every_choice_in_order() -> None:
    from engine.outputs import CompletionOutput, Logprob, RequestOutput, merge_into

    def delta(*choices: tuple[int, str, int, str | None], finished: bool = False) -> RequestOutput:
        outs = [CompletionOutput(i, text, [tid], [{tid: Logprob(-0.5, 1)}], reason) for i, text, tid, reason in choices]
        return RequestOutput("r", None, [1, 2], outs, finished, metrics={"arrival_time": 1.0})

    first = delta((0, "a", 10, None))
    later = [delta((1, "x", 20, None)), delta((0, "b", 11, None), (1, "y", 21, "length")),
             delta((0, "c", 12, "stop"), finished=True)]
    merged = merge_into(first, later)
    assert merged.finished
    got = {c.index: (c.text, c.token_ids, [list(d) for d in c.logprobs], c.finish_reason) for c in merged.outputs}
    assert got == {0: ("abc", [10, 11, 12], [[10], [11], [12]], "stop"), 1: ("xy", [20, 21], [[20], [21]], "length")}


def test_step_times_leave_idle_time_out() -> None:
    from engine.stats import StepTimes

    times = StepTimes()
    since = times.since
    times.pause()
    time.sleep(0.2)
    times.resume()
    assert times.since - since >= 0.2  # steps/s and loop cpu count busy time only
    # The first step after the pause: the worker's wait for it spans the idle time, not a late plan.
    from engine.messages import StepResult

    t = times.since
    for wait in (0.2, 0.003):
        times.add(1, 1, (t, t, t, t, t), StepResult(1, [], [], execute_seconds=0.01, wait_seconds=wait), 0.0)
    assert times.seconds["worker idle"] == pytest.approx(0.003)


@_SHARED_LOOP
async def test_closing_the_stream_aborts_and_frees_slots(engine: AsyncEngine) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    streams = [engine.generate(list(range(3, 60)), params, f"r{i}") for i in range(8)]
    for stream in streams:
        await stream.__anext__()
    assert engine.stats().num_running == 8 and engine.stats().kv_cache_usage > 0
    for stream in streams:
        await stream.aclose()
    await asyncio.sleep(0.05)
    stats = engine.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_cache_usage == 0
    # The engine keeps serving afterwards.
    done = [o async for o in engine.generate([3, 4], SamplingParams(max_tokens=3, ignore_eos=True), "after")]
    assert len(done[-1].outputs[0].token_ids) == 3


@_SHARED_LOOP
async def test_abort_all_ends_every_open_request_as_aborted(engine: AsyncEngine) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    streams = [engine.generate(list(range(3, 40)), params, f"r{i}") for i in range(3)]
    for stream in streams:
        await stream.__anext__()
    await engine.abort_all()
    for stream in streams:
        last = [out async for out in stream][-1]
        assert last.finished and last.outputs[0].finish_reason == "abort"
    stats = engine.stats()
    assert stats.num_running == 0 and stats.kv_cache_usage == 0


async def test_a_server_process_freezes_its_startup_objects_until_shutdown(model_dir: str) -> None:
    engine = AsyncEngine(EngineConfig(model=model_dir, dtype="float32", kv_cache_memory_gb=0.01))
    assert gc.get_freeze_count() == 0
    thresholds = gc.get_threshold()
    await engine.start(freeze_startup_objects=True)
    try:
        assert gc.get_freeze_count() > 0  # out of the collector's view: the model, tokenizer, modules
    finally:
        await engine.shutdown()
        gc.set_threshold(*thresholds)  # the rest of this test process collects as before
    assert gc.get_freeze_count() == 0
    plain = await _started(model_dir)  # a caller that does not own its process: nothing frozen
    try:
        assert gc.get_freeze_count() == 0
    finally:
        await plain.shutdown()


@_SHARED_LOOP
async def test_a_sink_gets_each_output_once_in_order_as_the_iterator_does(engine: AsyncEngine) -> None:
    # A request's sink (the one way out) gets the deltas an iterated request gets, from the
    # engine loop, in order, the finished output once and last.
    prompt = [5, 9, 11, 200, 17]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, n=2, seed=1,
                            output_kind=RequestOutputKind.DELTA)
    want: dict[int, list[int]] = {0: [], 1: []}
    async for out in engine.generate(prompt, params, "iterated"):
        for c in out.outputs:
            want[c.index] += c.token_ids
    items: list[object] = []
    done = asyncio.get_running_loop().create_future()

    def sink(item: object) -> None:
        items.append(item)
        if getattr(item, "finished", False):
            done.set_result(None)

    engine.add_request(prompt, params, "pushed", sink)
    await asyncio.wait_for(done, 10)
    await asyncio.sleep(0.1)  # nothing comes after the finished output
    assert all(isinstance(item, RequestOutput) for item in items)
    assert [item.finished for item in items] == [False] * (len(items) - 1) + [True]  # type: ignore[attr-defined]
    got: dict[int, list[int]] = {0: [], 1: []}
    finishes: list[int] = []
    for item in items:
        for c in item.outputs:  # type: ignore[attr-defined]
            got[c.index] += c.token_ids
            if c.finish_reason is not None:
                finishes.append(c.index)
    assert got == want and sorted(finishes) == [0, 1]
    count = len(items)
    await engine.abort("pushed")  # a finished request: nothing to abort, nothing delivered
    assert len(items) == count


@pytest.mark.parametrize("abort_after", [1, 2, 5])
@_SHARED_LOOP
async def test_an_aborted_request_gets_its_outputs_once_then_the_abort_and_frees(engine: AsyncEngine, abort_after: int) -> None:
    # Aborted from another task after its sink got `abort_after` outputs: the consumer gets
    # every token computed so far once and in order (none still on its way is lost or
    # repeated), then the abort as the last output; its slots are free.
    prompt = list(range(3, 40))
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    (want,) = [o async for o in engine.generate(prompt, dataclasses.replace(
        params, output_kind=RequestOutputKind.FINAL_ONLY), "reference")]
    items: list[RequestOutput] = []
    reached = asyncio.Event()

    def sink(item: object) -> None:
        assert isinstance(item, RequestOutput)
        items.append(item)
        if len(items) == abort_after:
            reached.set()

    engine.add_request(prompt, params, "victim", sink)
    await reached.wait()
    assert engine.core is not None
    num_sampled = engine.core.requests["victim"].choices[0].seq.num_sampled_tokens  # processed so far
    await engine.abort("victim")
    count = len(items)
    await asyncio.sleep(0.2)  # the steps in flight end: nothing more comes
    assert len(items) == count
    assert items[-1].finished and items[-1].outputs[0].finish_reason == "abort"
    assert not any(item.finished for item in items[:-1])
    tokens = [t for item in items for c in item.outputs for t in c.token_ids]
    assert tokens == want.outputs[0].token_ids[:num_sampled] and num_sampled >= abort_after
    stats = engine.stats()
    assert stats.num_running == 0 and stats.kv_cache_usage == 0


@_SHARED_LOOP
async def test_an_abort_while_an_output_is_on_its_way_hands_it_over_first(engine: AsyncEngine) -> None:
    # A step's outputs wait for the next step to be sent; an abort in that window gives the
    # consumer that output, then the abort: none is lost, none comes twice or after the end.
    prompt = list(range(3, 40))
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    items: list[RequestOutput] = []
    engine.add_request(prompt, params, "victim", items.append)  # type: ignore[arg-type]

    def on_its_way() -> RequestOutput | None:
        return next((o for o in engine._undelivered if o.request_id == "victim"), None)

    while len(items) < 3 or on_its_way() is None:  # polled at every turn of the event loop
        await asyncio.sleep(0)
    waiting = on_its_way()
    assert waiting is not None and engine.core is not None
    num_sampled = engine.core.requests["victim"].choices[0].seq.num_sampled_tokens
    await engine.abort("victim")
    assert items[-2] is waiting and items[-1].outputs[0].finish_reason == "abort"
    count = len(items)
    await asyncio.sleep(0.2)
    assert len(items) == count
    assert sum(len(o.outputs[0].token_ids) for o in items) == num_sampled
    assert engine.stats().num_running == 0


async def test_a_sink_gets_the_abort_and_the_engine_death(model_dir: str) -> None:
    engine = await _started(model_dir)
    try:
        params = SamplingParams(max_tokens=400, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
        items: dict[str, list[object]] = {"a": [], "b": []}
        for rid in items:
            engine.add_request(list(range(3, 40)), params, rid, items[rid].append)
        while not all(items.values()):
            await asyncio.sleep(0.01)
        await engine.abort("a")  # the abort output comes to the sink at once
        assert items["a"][-1].finished and items["a"][-1].outputs[0].finish_reason == "abort"  # type: ignore[attr-defined]
        assert engine.stats().num_running == 1
        num_a = len(items["a"])
        pid = engine.core.worker.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while not (items["b"] and isinstance(items["b"][-1], EngineDeadError)) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert isinstance(items["b"][-1], EngineDeadError)
        assert len(items["a"]) == num_a  # an aborted request hears nothing more, not even the death
        assert sum(isinstance(item, EngineDeadError) for item in items["b"]) == 1
        with pytest.raises(EngineDeadError):
            engine.add_request([3], params, "later", items["a"].append)
    finally:
        await engine.shutdown()


async def test_a_killed_worker_fails_running_requests_within_seconds(model_dir: str) -> None:
    engine = await _started(model_dir)
    try:
        params = SamplingParams(max_tokens=400, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
        stream = engine.generate(list(range(3, 40)), params, "victim")
        await stream.__anext__()
        pid = engine.core.worker.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        assert time.monotonic() - start < 5
        assert engine.errored
        with pytest.raises(EngineDeadError):
            await engine.generate([3], params, "later").__anext__()
    finally:
        await engine.shutdown()


async def test_a_worker_dying_while_idle_is_noticed(model_dir: str) -> None:
    engine = await _started(model_dir)
    try:
        pid = engine.core.worker.pid
        assert pid is not None and not engine.errored
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 3
        while not engine.errored and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert engine.errored
    finally:
        await engine.shutdown()


def test_step_times_are_logged_per_step_while_busy(caplog: pytest.LogCaptureFixture) -> None:
    from engine.messages import StepResult
    from engine.stats import EngineStats, StepTimes

    times = StepTimes()
    stats = EngineStats(num_running=3, num_waiting=1, kv_cache_usage=0.25, kv_cache_capacity_tokens=100)
    t = times.since
    result = StepResult(1, [], [], execute_seconds=0.009, wait_seconds=0.0005)
    times.add(3, 40, (t, t + 0.001, t + 0.011, t + 0.013, t + 0.014), result, 0.001)
    times.add(3, 3, (t, t + 0.001, t + 0.011, t + 0.013, t + 0.014), result, 0.002, push=0.004)
    with caplog.at_level(logging.INFO, logger="engine.stats"):
        times.maybe_log(t + 1.0, stats)  # too soon: nothing
        assert not caplog.records
        times.maybe_log(t + 20.0, stats)
    (record,) = caplog.records
    message = record.getMessage()
    assert "3.0 seqs and 22 tokens per step" in message and (
        "schedule 1.00, worker 10.00, process 2.00, rest 1.00, execute 9.00, worker idle 0.50, loop lag 1.50, "
        "push 2.00, loop cpu "
    ) in message
    assert "running 3, waiting 1, KV cache 25%" in message
    assert times.steps == 0  # the next interval starts empty


async def test_server_loop_without_overlap_gives_the_same_tokens(model_dir: str) -> None:
    """The server's loop with one step in flight (`overlap_scheduling=False`): concurrent
    streams, two of them closed midway, give the tokens the overlapped loop gives, and the
    aborted ones free their slots."""
    prompts = [[5 + i, 9, 11, 200 + i, 17] * (1 + i % 3) for i in range(8)]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    results: dict[bool, list[list[int]]] = {}
    for overlap in (True, False):
        engine = AsyncEngine(EngineConfig(model=model_dir, dtype="float32", kv_cache_memory_gb=0.01,
                                          max_num_seqs=3, overlap_scheduling=overlap))
        await engine.start()
        try:
            async def run(i: int, engine: AsyncEngine = engine) -> list[int]:
                tokens: list[int] = []
                async for out in engine.generate(prompts[i], params, f"r{i}"):
                    tokens += out.outputs[0].token_ids
                    if i in (2, 5) and len(tokens) >= 3:
                        break  # the client goes away
                return tokens

            results[overlap] = list(await asyncio.gather(*(run(i) for i in range(8))))
            for _ in range(100):  # the loop notices the closed streams at its next step
                if engine.stats().num_running == 0 and engine.stats().kv_cache_usage == 0:
                    break
                await asyncio.sleep(0.05)
            assert engine.stats().num_running == 0 and engine.stats().kv_cache_usage == 0
        finally:
            await engine.shutdown()
    assert results[True] == results[False]
    assert [len(t) for t in results[False]] == [10, 10, 3, 10, 10, 3, 10, 10]
