"""`AsyncEngine`: the engine loop as an asyncio task beside the HTTP server.

One task runs schedule → send plan → await result → process, forever. The plan is sent and
the worker's answer awaited in a dedicated thread, so the event loop keeps serving HTTP while
the model runs, and never blocks on a worker's pipe. A worker that dies, or hangs past the
step timeout (the worker client's watchdog), fails every in-flight request with
`EngineDeadError`.
Each request has an `asyncio.Queue` of delta outputs; `generate()` turns them into what the
caller's `output_kind` asks for. Closing the iterator early aborts the request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from engine.config import EngineConfig
from engine.engine_core import EngineCore, EngineStats
from engine.errors import EngineDeadError, EngineOverloadedError
from engine.outputs import OutputAccumulator, RequestOutput
from engine.sampling_params import RequestOutputKind, SamplingParams
from engine.worker import ProgressFn

logger = logging.getLogger(__name__)

_Item = RequestOutput | BaseException
_IDLE_CHECK_S = 0.5  # how often an idle engine checks that its worker is alive


class AsyncEngine:
    def __init__(self, config: EngineConfig | None = None, **kwargs: Any) -> None:
        self.config = config if config is not None else EngineConfig(**kwargs)
        self.core: EngineCore | None = None
        self._queues: dict[str, asyncio.Queue[_Item]] = {}
        self._wakeup = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._recv_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightgate-recv")
        self.dead_error: EngineDeadError | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, progress: ProgressFn | None = None) -> None:
        self.core = await asyncio.to_thread(EngineCore, self.config, progress)
        self._loop_task = asyncio.create_task(self._run(), name="lightgate-engine-loop")

    async def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except (asyncio.CancelledError, Exception):
                pass
        if self.core is not None:
            await asyncio.to_thread(self.core.shutdown)
        self._recv_thread.shutdown(wait=False)

    def _core(self) -> EngineCore:
        if self.core is None:
            raise RuntimeError("the engine is not started: await engine.start() first")
        return self.core

    @property
    def tokenizer(self) -> Any:
        return self._core().tokenizer

    @property
    def max_model_len(self) -> int:
        return self._core().max_model_len

    @property
    def model_name(self) -> str:
        return self._core().model_name

    @property
    def errored(self) -> bool:
        return self.dead_error is not None

    @property
    def is_ready(self) -> bool:
        return self.core is not None and not self.errored

    def stats(self) -> EngineStats:
        return self._core().stats()

    # -- requests -------------------------------------------------------------------------

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        core = self._core()
        if self.dead_error is not None:
            raise self.dead_error
        if core.scheduler.num_waiting >= self.config.max_waiting_requests:
            raise EngineOverloadedError("the waiting queue is full; retry later")
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        core.add_request(request_id, prompt, params)  # raises ValueError on bad input
        self._queues[request_id] = queue
        self._wakeup.set()
        acc = OutputAccumulator(params.n) if params.output_kind is not RequestOutputKind.DELTA else None
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                if acc is None:
                    yield item
                    continue
                acc.add(item)
                if finished or params.output_kind is RequestOutputKind.CUMULATIVE:
                    yield acc.result()
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self._abort(request_id)

    async def abort(self, request_id: str) -> None:
        out = self._abort(request_id)
        queue = self._queues.get(request_id)
        if out is not None and queue is not None:
            queue.put_nowait(out)

    def _abort(self, request_id: str) -> RequestOutput | None:
        if self.core is None:
            return None
        return self.core.abort_request(request_id)

    # -- the loop -------------------------------------------------------------------------

    async def _run(self) -> None:
        core = self._core()
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not core.has_unfinished():
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), _IDLE_CHECK_S)
                    except asyncio.TimeoutError:
                        if not core.worker.alive:  # noticed while idle, not only at the next request
                            raise EngineDeadError(core.worker.dead_reason or "the worker process exited") from None
                    continue
                planned = core.schedule()
                if planned is None:
                    await asyncio.sleep(0.001)
                    continue
                sched, plan = planned
                result = await loop.run_in_executor(self._recv_thread, core.worker.execute, plan)
                for out in core.process(sched, plan, result):
                    queue = self._queues.get(out.request_id)
                    if queue is not None:
                        queue.put_nowait(out)
                await asyncio.sleep(0)  # let HTTP handlers run between steps
        except EngineDeadError as e:
            self._fail_all(e)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug in the loop must not leave clients hanging
            logger.exception("engine loop failed")
            self._fail_all(EngineDeadError(f"engine loop failed: {e!r}"))

    def _fail_all(self, error: EngineDeadError) -> None:
        self.dead_error = error
        for queue in self._queues.values():
            queue.put_nowait(error)
