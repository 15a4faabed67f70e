"""The server process's handle on the model workers: start them, send plans, receive results.

`WorkerClient` spawns one worker process per tensor-parallel rank (`engine.worker.process`),
exchanges `(kind, payload)` messages with them over pipes (see that module), and watches every
rank: an error message or an exit from any of them marks the engine dead (`EngineDeadError`)
and the remaining ranks are killed, so a collective that waits for a dead peer never hangs
the server.

A rank that hangs instead of dying (stopped, deadlocked, stuck in a driver call) is caught by
a watchdog thread: every step must produce its result within `step_timeout_s` (longer for the
first steps, which compile kernels). A rank hung inside a collective holds the others up in
the same collective, so the one timeout covers that too. When it expires, the engine is dead
as above and every rank is killed (SIGKILL also ends a stopped process); the thread blocked
on the pipes then sees them close and raises `EngineDeadError` with the timeout as reason.
"""


from __future__ import annotations

import collections
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection, wait
from typing import Any

import torch.multiprocessing as mp

from engine.config import WARMUP_STEPS, WARMUP_TIMEOUT_FACTOR, EngineConfig
from engine.errors import EngineDeadError
from engine.messages import StepPlan, StepResult, WorkerInfo
from engine.worker.process import ProgressFn, worker_main

logger = logging.getLogger(__name__)


def _process_state(pid: int | None) -> str:
    """What the OS says a process is doing (Linux /proc), for the hung-worker message."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "state unknown"
    names = {
        "R": "running",
        "S": "sleeping",
        "D": "in uninterruptible I/O",
        "T": "stopped",
        "t": "stopped by a tracer",
        "Z": "exited",
    }
    return names.get(state, f"state {state}")


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Keep a spawned worker from re-running the user's script.

    A spawned child re-executes the parent's `__main__` file unless the script guards its
    top level with `if __name__ == "__main__"`. The worker's entry point is an importable
    function and needs nothing from `__main__`, so while the process starts the script's path
    is hidden from multiprocessing; plain scripts then work with or without the guard.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or path is None or getattr(main, "__spec__", None) is not None:
        yield
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = path


class WorkerClient:
    """Starts the worker processes (one per tensor-parallel rank) and exchanges plans and
    results with them."""

    def __init__(self, config: EngineConfig, model_path: str) -> None:
        ctx = mp.get_context("spawn")
        n = config.tensor_parallel_size
        port = 0
        if n > 1:
            from engine.distributed import find_free_port

            port = find_free_port()
            if config.resolved_device().startswith("cuda"):
                os.environ["NCCL_NVLS_ENABLE"] = "0"  # inherited by the workers: never NVLink multicast
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        for rank in range(n):
            conn, child_conn = ctx.Pipe(duplex=True)
            proc = ctx.Process(
                target=worker_main,
                args=(child_conn, config, model_path, os.getpid(), rank, port),
                name="lightgate-worker" if n == 1 else f"lightgate-worker-{rank}",
                daemon=True,
            )
            with _main_module_hidden():
                proc.start()
            child_conn.close()
            self._conns.append(conn)
            self._procs.append(proc)
        self._ready = [False] * n
        self.dead_reason: str | None = None
        self._dead_lock = threading.Lock()  # the watchdog and the receiving thread may both fail
        # The step watchdog: armed by send_step, disarmed by recv_result.
        self.step_timeout_s = config.resolved_step_timeout_s()  # None: no watchdog
        self._steps_sent = 0
        self._watch = threading.Condition()
        # (monotonic deadline, timeout, step id) of each step in flight, oldest first
        self._deadlines: collections.deque[tuple[float, float, int]] = collections.deque()
        self._closed = False
        self._watchdog: threading.Thread | None = None

    @property
    def pids(self) -> list[int | None]:
        return [p.pid for p in self._procs]

    def wait_ready(self, progress: ProgressFn | None = None) -> WorkerInfo:
        info: WorkerInfo | None = None
        while not self._ready[0]:
            kind, payload = self._recv()
            if kind == "progress":
                if progress is not None:
                    progress(*payload)
            elif kind == "ready":
                info = payload
                self._ready[0] = True
            else:
                raise self._died(f"the worker failed to start:\n{payload}")
        for rank in range(1, len(self._conns)):
            while not self._ready[rank]:
                kind, payload = self._recv(rank)
                if kind == "ready":
                    self._ready[rank] = True
                elif kind != "progress":
                    raise self._died(f"worker rank {rank} failed to start:\n{payload}")
        assert info is not None
        return info

    def send_step(self, plan: StepPlan) -> None:
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        self._arm(plan.step_id)  # before sending: a hung rank with a full pipe blocks the send too
        for rank, conn in enumerate(self._conns):
            try:
                conn.send(("step", plan))
            except (OSError, ValueError) as e:
                raise self._died(f"worker rank {rank} is gone: {e}") from e

    def recv_result(self) -> StepResult:
        try:
            kind, payload = self._recv()
        finally:
            self._disarm()
        if kind != "result":
            raise self._died(f"the worker failed:\n{payload}")
        return payload

    def _recv(self, rank: int = 0) -> tuple[str, Any]:
        """The next message from `rank`, while watching every other rank for an error or an exit."""
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        conn = self._conns[rank]
        if len(self._conns) == 1:
            return self._recv_one(rank)
        watched: list[Any] = [*self._conns, *(p.sentinel for p in self._procs)]
        while True:
            ready = wait(watched)
            if conn in ready:
                return self._recv_one(rank)
            for other, other_conn in enumerate(self._conns):
                if other_conn in ready:
                    kind, payload = self._recv_one(other)
                    if kind == "error":
                        raise self._died(f"worker rank {other} failed:\n{payload}")
                    if kind == "ready":
                        self._ready[other] = True
            for other, proc in enumerate(self._procs):
                if proc.sentinel in ready:
                    raise self._died(f"worker rank {other} exited (exit code {proc.exitcode})")

    def _recv_one(self, rank: int) -> tuple[str, Any]:
        try:
            message: tuple[str, Any] = self._conns[rank].recv()
            return message
        except (EOFError, OSError) as e:
            proc = self._procs[rank]
            proc.join(0.1)
            code = proc.exitcode
            who = "the worker process" if len(self._procs) == 1 else f"worker rank {rank}"
            raise self._died(f"{who} exited (exit code {code})") from e

    # -- the step watchdog -------------------------------------------------------------------

    def _arm(self, step_id: int) -> None:
        if self.step_timeout_s is None:
            return
        self._steps_sent += 1
        timeout = self.step_timeout_s
        if self._steps_sent <= WARMUP_STEPS:
            timeout *= WARMUP_TIMEOUT_FACTOR  # kernels compile on first use
        with self._watch:
            self._deadlines.append((time.monotonic() + timeout, timeout, step_id))
            self._watch.notify()
        if self._watchdog is None:
            self._watchdog = threading.Thread(
                target=self._watch_steps, name="lightgate-watchdog", daemon=True
            )
            self._watchdog.start()

    def _disarm(self) -> None:
        if self.step_timeout_s is None:
            return
        with self._watch:
            if self._deadlines:
                self._deadlines.popleft()  # results come back in the order the steps were sent
            if self._deadlines:  # the next step starts now: its time counts from here
                _, timeout, step_id = self._deadlines[0]
                self._deadlines[0] = (time.monotonic() + timeout, timeout, step_id)
            self._watch.notify()

    def _watch_steps(self) -> None:
        with self._watch:
            while True:
                if self._closed:
                    return
                if not self._deadlines:
                    self._watch.wait()
                    continue
                deadline, timeout, step_id = self._deadlines[0]
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    self._watch.wait(remaining)
                    continue
                self._deadlines.clear()
                break
        states = ", ".join(
            f"rank {rank}: {_process_state(proc.pid)}" for rank, proc in enumerate(self._procs)
        )
        self._died(
            f"step {step_id} got no result within {timeout:g} s (step_timeout_s): a worker is hung "
            f"({states}); every worker process was killed"
        )

    # -- failure --------------------------------------------------------------------------------

    def _died(self, reason: str) -> EngineDeadError:
        """Mark the engine dead (the first reason wins) and kill every rank that is left."""
        with self._dead_lock:
            if self.dead_reason is None:
                self.dead_reason = reason
                logger.error(reason)
            reason = self.dead_reason
        # A rank still alive is hung, or would wait for a dead peer inside a collective.
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
        deadline = time.monotonic() + 5.0
        for proc in self._procs:  # reap them (SIGKILL also ends a stopped process)
            proc.join(max(0.0, deadline - time.monotonic()))
        return EngineDeadError(reason)

    @property
    def alive(self) -> bool:
        return self.dead_reason is None and all(p.is_alive() for p in self._procs)

    @property
    def pid(self) -> int | None:
        return self._procs[0].pid

    def shutdown(self, timeout: float = 5.0) -> None:
        with self._watch:
            self._closed = True
            self._deadlines.clear()
            self._watch.notify()
        for proc, conn in zip(self._procs, self._conns, strict=True):
            if proc.is_alive():
                try:
                    conn.send(("stop", None))
                except (OSError, ValueError):
                    pass
        for proc in self._procs:
            proc.join(timeout)
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout)
        for conn in self._conns:
            conn.close()
