"""`OutputStream`: a request's outputs for one consumer, awaited one by one or forwarded."""

from __future__ import annotations

import asyncio

import pytest

from engine import EngineDeadError, OutputStream
from engine.outputs import CompletionOutput, RequestOutput


def _delta(token_id: int, finish: str | None = None) -> RequestOutput:
    choice = CompletionOutput(0, f"<{token_id}>", [token_id], None, finish)
    return RequestOutput("r", None, [1, 2], [choice], finish is not None)


async def test_a_waiting_consumer_gets_each_output_as_it_comes() -> None:
    stream = OutputStream()
    got: list[list[int]] = []

    async def consume() -> None:
        while True:
            out = await stream.get()
            got.append(out.outputs[0].token_ids)
            if out.finished:
                return

    task = asyncio.ensure_future(consume())
    for i in range(3):
        await asyncio.sleep(0)
        assert got == [[t] for t in range(i)]  # waiting, woken by each put
        stream.put(_delta(i, "stop" if i == 2 else None))
    await asyncio.wait_for(task, 1)
    assert got == [[0], [1], [2]]


async def test_outputs_queued_behind_a_busy_consumer_come_as_one_then_the_error() -> None:
    stream = OutputStream()
    for i in range(3):
        stream.put(_delta(i))
    error = EngineDeadError("the worker process exited")
    stream.put(error)
    out = await stream.get()
    assert out.outputs[0].token_ids == [0, 1, 2] and out.outputs[0].text == "<0><1><2>" and not out.finished
    with pytest.raises(EngineDeadError):  # after the outputs that came before it
        await stream.get()


async def test_merging_stops_at_the_finished_output() -> None:
    stream = OutputStream()
    for i, finish in enumerate([None, "length"]):
        stream.put(_delta(i, finish))
    out = await stream.get()
    assert out.finished and out.outputs[0].token_ids == [0, 1] and out.outputs[0].finish_reason == "length"


def test_forwarding_passes_the_queued_outputs_first_in_order_then_each_as_it_comes() -> None:
    stream = OutputStream()
    stream.put(_delta(0))
    stream.put(_delta(1))
    taken: list[object] = []
    stream.forward_to(taken.append)
    assert [o.outputs[0].token_ids for o in taken] == [[0], [1]]  # type: ignore[attr-defined]
    stream.put(_delta(2, "stop"))
    error = EngineDeadError("gone")
    stream.put(error)
    assert len(taken) == 4 and taken[2].outputs[0].token_ids == [2] and taken[3] is error  # type: ignore[attr-defined]
