"""`GenerationStream` over a real engine: the first output prefetched, the rest pulled or
pushed (each once, in order), an engine error handed on, closing aborts and frees."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from engine import (
    AsyncEngine,
    EngineConfig,
    EngineDeadError,
    RequestOutput,
    RequestOutputKind,
    SamplingParams,
)
from openai_compat.generation import GenerationStream
from openai_compat.metrics import Metrics
from tests.engine.models.harness import save_tiny_model, tiny_config

PROMPT = [5, 9, 11, 200, 17]


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    save_tiny_model(str(tmp_path), tiny_config("llama"))
    engine = AsyncEngine(EngineConfig(model=str(tmp_path), dtype="float32", kv_cache_memory_gb=0.01))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.shutdown()


def _params(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, n=2, seed=1,
                          output_kind=RequestOutputKind.DELTA)


def _stream(engine: AsyncEngine, metrics: Metrics, request_id: str, max_tokens: int) -> GenerationStream:
    return GenerationStream(engine, PROMPT, _params(max_tokens), request_id, metrics.recorder())


def _tokens(outputs: list[RequestOutput]) -> dict[int, list[int]]:
    tokens: dict[int, list[int]] = {0: [], 1: []}
    for out in outputs:
        for c in out.outputs:
            tokens[c.index] += c.token_ids
    return tokens


async def test_pulled_and_pushed_outputs_come_once_in_order(engine: AsyncEngine) -> None:
    metrics = Metrics(lambda: None)
    pulled = _stream(engine, metrics, "pulled", 12)
    await pulled.start()
    outs = []
    while (out := await pulled.next_output()) is not None:
        outs.append(out)
    want = _tokens(outs)
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])

    pushed = _stream(engine, metrics, "pushed", 12)
    await pushed.start()
    await asyncio.sleep(0.2)  # outputs queue up behind the prefetched one before the push
    got: list[RequestOutput] = []
    errors: list[BaseException] = []
    done = asyncio.get_running_loop().create_future()

    def on_output(out: RequestOutput) -> None:
        got.append(out)
        if out.finished:
            done.set_result(None)

    pushed.push(on_output, errors.append)
    await asyncio.wait_for(done, 10)
    await asyncio.sleep(0.1)
    assert _tokens(got) == want and not errors
    assert got[-1].finished and not any(o.finished for o in got[:-1])
    finishes = [c.index for o in got for c in o.outputs if c.finish_reason is not None]
    assert sorted(finishes) == [0, 1]
    assert pushed.num_generated_tokens == 24 and pushed.finished
    count = len(got)
    await pushed.close()  # finished: nothing to abort, nothing more comes
    assert len(got) == count


async def test_closing_a_pushed_stream_aborts_and_frees(engine: AsyncEngine) -> None:
    stream = _stream(engine, Metrics(lambda: None), "closed", 300)
    await stream.start()
    got: list[RequestOutput] = []
    stream.push(got.append, lambda e: pytest.fail(f"unexpected error {e!r}"))
    while len(got) < 3:
        await asyncio.sleep(0.01)
    assert engine.stats().num_running == 2
    await stream.close()
    count = len(got)
    await asyncio.sleep(0.2)
    assert len(got) == count  # nothing after the close
    stats = engine.stats()
    assert stats.num_running == 0 and stats.kv_cache_usage == 0


async def test_an_engine_death_goes_to_the_pushed_stream_once(engine: AsyncEngine) -> None:
    stream = _stream(engine, Metrics(lambda: None), "victim", 300)
    await stream.start()
    errors: list[BaseException] = []
    stream.push(lambda out: None, errors.append)
    assert engine.core is not None and engine.core.worker.pid is not None
    os.kill(engine.core.worker.pid, signal.SIGKILL)
    for _ in range(100):
        if errors:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.1)
    assert len(errors) == 1 and isinstance(errors[0], EngineDeadError) and stream.finished
    await stream.close()
