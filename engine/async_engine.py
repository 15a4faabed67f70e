"""`AsyncEngine`: the engine loop as an asyncio task beside the HTTP server.

One task runs the steps, overlapped: while the worker runs step k, the loop has already planned
and sent step k+1 (whose decodes read step k's sampled tokens on the device), then waits for
step k's result, processes it (appends tokens, detokenizes, finishes requests), and plans step
k+2. A request that finishes at step k has computed one wasted token in step k+1. Plans are
sent and results awaited in a dedicated thread, so the event loop keeps serving HTTP while the
model runs and never blocks on a worker's pipe. A worker that dies, or hangs past the step
timeout (the worker client's watchdog), fails every open request with `EngineDeadError`.

Outputs take one way out: each request has one consumer, a sink given to `add_request`. The
loop calls it with each step's delta output of the request once the next step is sent (the
sending thread does not wait for the GIL while the consumers take them, and they take them
while the worker computes), and last with the finished output or the error that ends the
request. A call, not a task woken up: a streaming response writes its events in it. `generate()`
is an async iterator built on the same sink (`OutputStream`); closing it early aborts the
request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import engine.gc_tuning as gc_tuning
from engine.config import EngineConfig
from engine.engine_core import EngineCore
from engine.errors import EngineDeadError, EngineOverloadedError
from engine.messages import StepResult
from engine.multimodal import ImageInput, ImageProcessor
from engine.output_stream import OutputItem, OutputStream, Sink
from engine.outputs import OutputAccumulator, RequestOutput
from engine.sampling_params import RequestOutputKind, SamplingParams
from engine.stats import EngineStats, StepTimes
from engine.structured_output import StructuredOutput
from engine.worker.process import ProgressFn

logger = logging.getLogger(__name__)

_IDLE_CHECK_S = 0.5  # how often an idle engine checks that its worker is alive


class AsyncEngine:
    def __init__(self, config: EngineConfig | None = None, **kwargs: Any) -> None:
        self.config = config if config is not None else EngineConfig(**kwargs)
        self.core: EngineCore | None = None
        self._sinks: dict[str, Sink] = {}  # each open request's consumer
        self._undelivered: list[RequestOutput] = []  # the last step's, handed over once the next is sent
        self._wakeup = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._recv_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightgate-recv")
        self.dead_error: EngineDeadError | None = None
        self._froze_startup_objects = False

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, progress: ProgressFn | None = None, *, freeze_startup_objects: bool = False) -> None:
        """Load the model in the worker processes and start the engine loop.

        `freeze_startup_objects`, for a caller that owns its process (a server): once loaded, what
        start-up allocated leaves the garbage collector's view and collections run less often
        (`gc_tuning`), until `shutdown()`.
        """
        self.core = await asyncio.to_thread(EngineCore, self.config, progress)
        if freeze_startup_objects:
            gc_tuning.freeze_startup_objects()
            self._froze_startup_objects = True
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
        if self._froze_startup_objects:
            gc_tuning.unfreeze()
            self._froze_startup_objects = False

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

    def stats(self) -> EngineStats:
        return self._core().stats()

    # -- requests -------------------------------------------------------------------------

    async def compile_structured_output(self, so: StructuredOutput) -> None:
        """Compile a constraint for this model off the event loop, bounded in time, and cache
        it: `add_request` then finds it compiled. ValueError(message, field) when it cannot be
        enforced (the field: one of `StructuredOutput`'s), or takes too long to compile."""
        core = self._core()
        if core.grammar is None:
            core.grammar_compiler()  # raises: no tokenizer
        assert core.grammar is not None
        compiler = await asyncio.wrap_future(core.grammar)
        await compiler.compile_async(so)

    @property
    def image_processor(self) -> ImageProcessor | None:
        """The model's image preprocessing and placeholders; None for a model of text only."""
        return self._core().image_processor

    def add_request(
        self, prompt: str | list[int], params: SamplingParams, request_id: str, sink: Sink,
        images: Sequence[ImageInput] = (),
    ) -> None:
        """Start a request whose outputs go to `sink`, called from the engine loop: each step's
        delta output (whatever `params.output_kind` says), in order, the finished one last; or
        the `EngineDeadError` that ends it. `sink` must not block or raise. Raises ValueError
        for bad input, `EngineOverloadedError` when the waiting queue is full, `EngineDeadError`
        after a worker died. A constraint (`params.structured_output`) is compiled here unless
        `compile_structured_output` did it: await that first, so that a costly one does not
        hold up the event loop. `images` (`ImageProcessor.preprocess`d) fill the prompt's image
        placeholders, in order (`ImageProcessor.expand_placeholders`)."""
        core = self._core()
        if self.dead_error is not None:
            raise self.dead_error
        # Counted in sequences, as the queue is: a request of n choices needs n places.
        if core.num_waiting + params.n > self.config.max_waiting_requests:
            raise EngineOverloadedError("the waiting queue is full; retry later")
        if request_id in self._sinks:  # (its finished output may still be on its way)
            raise ValueError(f"request id {request_id!r} is already in use", "request_id")
        core.add_request(request_id, prompt, params, images)
        self._sinks[request_id] = sink
        self._wakeup.set()

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """The request's outputs as `params.output_kind` asks: each step's delta, the output so
        far after each step, or the final output only. Closing the iterator early aborts it."""
        if params.structured_output is not None:
            await self.compile_structured_output(params.structured_output)
        stream = OutputStream()
        self.add_request(prompt, params, request_id, stream.put)
        acc = OutputAccumulator(params.n) if params.output_kind is not RequestOutputKind.DELTA else None
        finished = False
        try:
            while not finished:
                try:
                    out = await stream.get()
                except Exception:  # the engine died: nothing left to abort
                    finished = True
                    raise
                finished = out.finished
                if acc is None:
                    yield out
                    continue
                acc.add(out)
                if finished or params.output_kind is RequestOutputKind.CUMULATIVE:
                    yield acc.result()
        finally:
            if not finished:
                self._abort(request_id)

    async def abort(self, request_id: str) -> None:
        """End the request now. Its consumer gets its last step's output, if not handed over
        yet, then the final output (the choices still running end with "abort")."""
        sink = self._sinks.get(request_id)
        out = self._abort(request_id)
        if sink is None:
            return
        for earlier in self._undelivered:
            if earlier.request_id == request_id:
                _call_sink(sink, earlier)
        if out is not None:
            _call_sink(sink, out)

    async def abort_all(self) -> None:
        """Abort every open request: each ends as `abort` ends one (finish reason "abort")."""
        for request_id in list(self._sinks):
            await self.abort(request_id)

    def _abort(self, request_id: str) -> RequestOutput | None:
        """Abort the request in the core and drop its consumer -> the abort output, if it ran."""
        self._sinks.pop(request_id, None)
        if self.core is None:
            return None
        return self.core.abort_request(request_id)

    # -- the loop -------------------------------------------------------------------------

    async def _run(self) -> None:
        core = self._core()
        times = StepTimes()
        try:
            while True:
                if core.has_work:
                    await self._step(core, times)  # (no yield between a step's processing and the next plan)
                else:
                    await self._idle(core, times)
        except EngineDeadError as e:
            self._deliver()
            self._fail_all(e)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug in the loop must not leave clients hanging
            logger.exception("engine loop failed")
            self._deliver()
            self._fail_all(EngineDeadError(f"engine loop failed: {e!r}"))

    async def _idle(self, core: EngineCore, times: StepTimes) -> None:
        """Nothing to run: hand over what is left, then wait for a request, checking now and
        then that the worker is alive (noticed while idle, not only at the next request)."""
        self._deliver()
        self._wakeup.clear()
        times.pause()
        try:
            await asyncio.wait_for(self._wakeup.wait(), _IDLE_CHECK_S)
        except asyncio.TimeoutError:
            if not core.alive:
                raise EngineDeadError(core.dead_reason or "the worker process exited") from None
        finally:
            times.resume()

    async def _step(self, core: EngineCore, times: StepTimes) -> None:
        """One turn of the cycle (`EngineCore.step`) with the sending and the wait in the
        receiving thread: plan step k+1 (at first step k too) while step k runs, send it, hand
        step k-1's outputs over once it is out, wait for step k's result and process it."""
        t0 = time.perf_counter()
        core.plan_ahead()
        if not core.num_in_flight:
            self._deliver()
            await asyncio.sleep(0.001)
            return
        t1 = time.perf_counter()
        loop = asyncio.get_running_loop()
        sent: asyncio.Future[None] | None = loop.create_future() if self._undelivered else None
        step = loop.run_in_executor(self._recv_thread, self._send_and_recv, sent)
        push_seconds = 0.0
        if sent is not None:
            # The last step's outputs go to their consumers while the worker runs this one,
            # once its plan is out: the sending thread needs the GIL that handing them over holds.
            await sent
            t_push = time.perf_counter()
            self._deliver()
            push_seconds = time.perf_counter() - t_push
            # Their consumers' turn: a worker that is already done would otherwise make the
            # await below return at once, and this step's outputs would follow before they ran.
            await asyncio.sleep(0)
        result, received = await step
        t2 = time.perf_counter()
        processed = core.process_result(result)
        t3 = time.perf_counter()
        # Handed over once the next step is sent; the consumers take them while the worker runs.
        self._undelivered = processed.outputs
        t4 = time.perf_counter()
        times.add(processed.num_seqs, processed.num_tokens, (t0, t1, t2, t3, t4), result, t2 - received, push_seconds)
        times.maybe_log(t4, core.stats())

    def _send_and_recv(self, sent: asyncio.Future[None] | None) -> tuple[StepResult, float]:
        """In the receiving thread: send the planned steps (then resolve `sent`), then wait for
        the oldest step's result -> (the result, when it came)."""
        core = self._core()
        try:
            core.send_planned()
        finally:
            if sent is not None:
                sent.get_loop().call_soon_threadsafe(_resolve, sent)
        result = core.recv_result()
        return result, time.perf_counter()

    def _deliver(self) -> None:
        """Hand the last step's outputs to their requests' consumers."""
        if not self._undelivered:
            return
        outputs, self._undelivered = self._undelivered, []
        sinks = self._sinks
        for out in outputs:
            # A finished output is its consumer's last.
            sink = sinks.pop(out.request_id, None) if out.finished else sinks.get(out.request_id)
            if sink is not None:
                _call_sink(sink, out)

    def _fail_all(self, error: EngineDeadError) -> None:
        self.dead_error = error
        sinks, self._sinks = self._sinks, {}
        for sink in sinks.values():
            _call_sink(sink, error)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _call_sink(sink: Sink, item: OutputItem) -> None:
    try:
        sink(item)
    except Exception:  # one consumer's bug must not stop the engine loop or the others
        logger.exception("a request's consumer failed to take an output")
