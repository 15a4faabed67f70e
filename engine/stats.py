"""What the engine tells about itself: `EngineStats`, a snapshot of its load (the server's
`/metrics` reads it), and `StepTimes`, where the server's engine loop spends its wall time,
logged while it is busy."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from engine.messages import StepResult

logger = logging.getLogger(__name__)

_STATS_LOG_S = 10.0  # how often a busy engine logs where its steps' time went


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # 0..1
    kv_cache_capacity_tokens: int
    prefix_cache_queries: int = 0  # cumulative prompt tokens looked up
    prefix_cache_hits: int = 0  # cumulative prompt tokens found


class StepTimes:
    """Where the engine loop's wall time goes, logged every `_STATS_LOG_S` while busy.

    schedule: planning the step; worker: the worker's round trip (send the plan, forward
    pass, sampling, the result back), of which execute is the worker's time from the step's
    launch to its tokens (and worker idle its wait for the plan with nothing on the device: with
    overlapped steps, near zero unless the loop is late); launched ahead: the steps whose result
    came after the next step's launch (`EngineConfig.launch_ahead`); loop lag: from the result's
    arrival to the loop taking it up, the event loop busy with other work (the requests'
    handlers, new requests): part of the round trip, and while it lasts the next step is not
    planned; push: the previous step's outputs handed to their requests' consumers (a streaming
    response writes its events to the socket then) while the worker runs; process: appending
    tokens, stop checks, detokenizing; rest: setting the step's outputs aside for their
    consumers, who get them once the next step is sent. loop cpu: the event loop thread's CPU
    time per step, this loop's phases and everything else on it (the handlers, HTTP): when it
    nears the step's wall time, the event loop, not the GPU, sets the pace.
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
