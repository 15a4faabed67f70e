"""`AsyncEngine`: the engine loop as an asyncio task beside the HTTP server.

One task runs the steps, overlapped: while the worker runs step k, the loop has already planned
and sent step k+1 (whose decodes read step k's sampled tokens on the device), then waits for
step k's result, processes it (appends tokens, detokenizes, finishes requests), and plans step
k+2. A request that finishes at step k has computed one wasted token in step k+1. Plans are
sent and results awaited in a dedicated thread, so the event loop keeps serving HTTP while the
model runs and never blocks on a worker's pipe; it does not yield between processing a step
and planning the next, so the requests' handlers stream a step's outputs while the worker
computes. A worker that dies, or hangs past the step timeout (the worker client's watchdog),
fails every in-flight request with `EngineDeadError`.
Each request has an `asyncio.Queue` of delta outputs; `generate()` turns them into what the
caller's `output_kind` asks for. Closing the iterator early aborts the request.
A streaming consumer may instead have its outputs pushed (`push`): the loop calls it with each
step's outputs once the next step is sent, so a stream costs a call, not a task waking up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import engine.gc_tuning as gc_tuning
from engine.config import EngineConfig
from engine.engine_core import EngineCore, EngineStats
from engine.errors import EngineDeadError, EngineOverloadedError
from engine.messages import StepPlan, StepResult
from engine.outputs import OutputAccumulator, RequestOutput, merge_into
from engine.sampling_params import RequestOutputKind, SamplingParams
from engine.worker.process import ProgressFn

logger = logging.getLogger(__name__)

_Item = RequestOutput | BaseException
Sink = Callable[[_Item], None]
_IDLE_CHECK_S = 0.5  # how often an idle engine checks that its worker is alive
_STATS_LOG_S = 10.0  # how often a busy engine logs where its steps' time went


class StepTimes:
    """Where the engine loop's wall time goes, logged every `_STATS_LOG_S` while busy.

    schedule: planning the step; worker: the worker's round trip (send the plan, forward
    pass, sampling, the result back), of which execute is the worker's time from the step's launch
    to its tokens (and worker idle its wait for the plan with nothing on the device: with
    overlapped steps, near zero unless the loop is late); launched ahead: the steps whose result
    came after the next step's launch (`EngineConfig.launch_ahead`); loop lag: from the result's
    arrival to the loop taking it up, the event loop busy with other work (the requests'
    handlers streaming, new requests): part of the round trip, and while it lasts the next
    step is not planned; push: the previous step's outputs handed to pushed streams (written
    to their sockets) while the worker runs; process: appending tokens, stop checks,
    detokenizing; rest: handing outputs to the requests' queues (their handlers stream them
    while the worker runs the next step, inside its round trip). loop cpu: the event loop thread's CPU time per step,
    this loop's phases and everything else on it (the handlers, HTTP): when it nears the
    step's wall time, the event loop, not the GPU, sets the pace.
    """

    PHASES = ("schedule", "worker", "process", "rest")  # consecutive spans of the loop
    WORKER_TIMES = ("execute", "worker idle", "loop lag", "push")  # within the worker's round trip
    LOOP_CPU = "loop cpu"

    def __init__(self) -> None:
        self.reset(time.perf_counter())

    def reset(self, now: float) -> None:
        self.since = now
        self.cpu_since = time.thread_time()  # of the thread that runs the loop (and logs)
        self._paused: tuple[float, float] | None = None
        self._idle_before_next = False  # the next result's worker idle spans the engine's idle time
        self.steps = self.seqs = self.tokens = self.launched_ahead = 0
        self.seconds = dict.fromkeys(self.PHASES + self.WORKER_TIMES, 0.0)

    def pause(self) -> None:
        """The engine goes idle: the time until `resume` counts neither as wall nor as loop CPU."""
        self._paused = (time.perf_counter(), time.thread_time())

    def resume(self) -> None:
        if self._paused is not None:
            wall, cpu = self._paused
            self.since += time.perf_counter() - wall
            self.cpu_since += time.thread_time() - cpu
            self._paused = None
            self._idle_before_next = True

    def add(
        self, seqs: int, tokens: int, times: tuple[float, ...], result: StepResult, lag: float, push: float = 0.0
    ) -> None:
        self.steps += 1
        self.seconds["loop lag"] += lag
        self.seconds["push"] += push
        self.seconds["execute"] += result.execute_seconds
        if self._idle_before_next:  # the worker waited for work that did not exist yet
            self._idle_before_next = False
        else:
            self.seconds["worker idle"] += result.wait_seconds
        self.launched_ahead += result.launched_ahead
        self.seqs += seqs
        self.tokens += tokens
        for name, start, end in zip(self.PHASES, times, times[1:], strict=False):
            self.seconds[name] += end - start

    def maybe_log(self, now: float, stats: EngineStats) -> None:
        if now - self.since < _STATS_LOG_S or not self.steps:
            return
        seconds = {**self.seconds, self.LOOP_CPU: time.thread_time() - self.cpu_since}
        per_step = ", ".join(f"{k} {1e3 * v / self.steps:.2f}" for k, v in seconds.items())
        logger.info(
            "%.1f steps/s, %.1f seqs and %.0f tokens per step; ms per step: %s; next step launched ahead "
            "%.0f%%; running %d, waiting %d, KV cache %.0f%%",
            self.steps / (now - self.since), self.seqs / self.steps, self.tokens / self.steps, per_step,
            100 * self.launched_ahead / self.steps, stats.num_running, stats.num_waiting, 100 * stats.kv_cache_usage,
        )
        self.reset(now)


class AsyncEngine:
    def __init__(self, config: EngineConfig | None = None, **kwargs: Any) -> None:
        self.config = config if config is not None else EngineConfig(**kwargs)
        self.core: EngineCore | None = None
        self._queues: dict[str, asyncio.Queue[_Item]] = {}
        self._sinks: dict[str, Sink] = {}  # requests whose outputs are pushed (`push`)
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
        # Counted in sequences, as the queue is: a request of n choices needs n places.
        if core.scheduler.num_waiting + params.n > self.config.max_waiting_requests:
            raise EngineOverloadedError("the waiting queue is full; retry later")
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        core.add_request(request_id, prompt, params)  # raises ValueError on bad input
        self._queues[request_id] = queue
        self._wakeup.set()
        acc = OutputAccumulator(params.n) if params.output_kind is not RequestOutputKind.DELTA else None
        finished = False
        held: _Item | None = None  # taken from the queue behind an output, delivered next
        try:
            while not finished:
                if held is not None:
                    item, held = held, None
                else:
                    item = await queue.get()
                # Outputs that queued up while the consumer was busy go out as one: a consumer
                # that falls behind (a slow client, a busy event loop) catches up at once.
                if isinstance(item, RequestOutput) and not item.finished and not queue.empty():
                    following: list[RequestOutput] = []
                    while not queue.empty():
                        nxt = queue.get_nowait()
                        if isinstance(nxt, BaseException):
                            held = nxt
                            break
                        following.append(nxt)
                        if nxt.finished:
                            break
                    item = merge_into(item, following)
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
            self._sinks.pop(request_id, None)
            if not finished:
                self._abort(request_id)

    def push(self, request_id: str, sink: Sink) -> None:
        """From now on, hand `request_id`'s outputs (delta outputs: its `generate()` must use
        `RequestOutputKind.DELTA`) and errors to `sink` instead of its `generate()` iterator:
        first those already queued, in order, now; then each step's, from the engine loop once
        the next step is sent. `sink` must not block or raise. The iterator stays open: closing
        it ends the request as before (an abort unless it finished)."""
        queue = self._queues.get(request_id)
        if queue is None:
            raise KeyError(f"no open request {request_id!r}")
        self._sinks[request_id] = sink
        while not queue.empty():
            _call_sink(sink, queue.get_nowait())

    async def abort(self, request_id: str) -> None:
        out = self._abort(request_id)
        if out is None:
            return
        sink = self._sinks.get(request_id)
        if sink is not None:
            _call_sink(sink, out)
            return
        queue = self._queues.get(request_id)
        if queue is not None:
            queue.put_nowait(out)

    async def abort_all(self) -> None:
        """Abort every open request: each ends as `abort` ends one (finish reason "abort")."""
        for request_id in list(self._queues):
            await self.abort(request_id)

    def _abort(self, request_id: str) -> RequestOutput | None:
        if self.core is None:
            return None
        return self.core.abort_request(request_id)

    # -- the loop -------------------------------------------------------------------------

    async def _run(self) -> None:
        core = self._core()
        loop = asyncio.get_running_loop()
        times = StepTimes()
        pushed: list[RequestOutput] = []  # the last step's outputs of pushed streams, for after the next send
        try:
            while True:
                if not core.has_work:
                    self._deliver(pushed)
                    self._wakeup.clear()
                    times.pause()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), _IDLE_CHECK_S)
                    except asyncio.TimeoutError:
                        if not core.worker.alive:  # noticed while idle, not only at the next request
                            raise EngineDeadError(core.worker.dead_reason or "the worker process exited") from None
                    finally:
                        times.resume()
                    continue
                t0 = time.perf_counter()
                plans = core.plan_ahead()  # step k+1 (and at first step k too), while step k runs
                if not core.in_flight:
                    self._deliver(pushed)
                    await asyncio.sleep(0.001)
                    continue
                t1 = time.perf_counter()
                sent: asyncio.Future[None] | None = loop.create_future() if pushed else None
                step = loop.run_in_executor(self._recv_thread, self._send_and_recv, plans, sent)
                push_seconds = 0.0
                if sent is not None:
                    # The last step's outputs go to their streams while the worker runs this one,
                    # once its plan is out: the sending thread needs the GIL that pushing holds.
                    await sent
                    t_push = time.perf_counter()
                    self._deliver(pushed)
                    push_seconds = time.perf_counter() - t_push
                result, received = await step
                t2 = time.perf_counter()
                sched, plan = core.in_flight[0]
                outputs = core.process_oldest(result)
                t3 = time.perf_counter()
                sinks = self._sinks
                for out in outputs:
                    if out.request_id in sinks:
                        pushed.append(out)
                        continue
                    queue = self._queues.get(out.request_id)
                    if queue is not None:
                        queue.put_nowait(out)
                # No yield here: the next step is planned and sent first, and the requests' handlers
                # stream these outputs while the worker runs (they run during that await).
                t4 = time.perf_counter()
                times.add(
                    len(plan.seqs), sched.num_batched_tokens, (t0, t1, t2, t3, t4), result, t2 - received,
                    push_seconds,
                )
                times.maybe_log(t4, core.stats())
        except EngineDeadError as e:
            self._deliver(pushed)
            self._fail_all(e)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug in the loop must not leave clients hanging
            logger.exception("engine loop failed")
            self._deliver(pushed)
            self._fail_all(EngineDeadError(f"engine loop failed: {e!r}"))

    def _deliver(self, pushed: list[RequestOutput]) -> None:
        """Hand outputs to their pushed streams (and empty the list)."""
        sinks = self._sinks
        for out in pushed:
            sink = sinks.get(out.request_id)
            if sink is not None:
                _call_sink(sink, out)
        pushed.clear()

    def _send_and_recv(
        self, plans: list[StepPlan], sent: asyncio.Future[None] | None = None
    ) -> tuple[StepResult, float]:
        """In the receiving thread: send the new plans (then resolve `sent`), then wait for the
        oldest step's result -> (the result, when it came)."""
        core = self._core()
        try:
            for plan in plans:
                core.worker.send_step(plan)
        finally:
            if sent is not None:
                sent.get_loop().call_soon_threadsafe(_resolve, sent)
        result = core.worker.recv_result()
        return result, time.perf_counter()

    def _fail_all(self, error: EngineDeadError) -> None:
        self.dead_error = error
        for request_id, queue in list(self._queues.items()):
            sink = self._sinks.get(request_id)
            if sink is not None:
                _call_sink(sink, error)
            else:
                queue.put_nowait(error)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _call_sink(sink: Sink, item: _Item) -> None:
    try:
        sink(item)
    except Exception:  # one stream's bug must not stop the engine loop or the other streams
        logger.exception("a pushed stream failed to take an output")
