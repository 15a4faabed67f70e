"""The model worker processes and the server process's handle on them.

A worker loads the model, allocates the KV pool, reports `WorkerInfo`, then answers one
`StepPlan` with one `StepResult` over a pipe until it is told to stop or its parent dies.
With `tensor_parallel_size=N` there are N workers, ranks 0..N-1 of one process group (gloo
on CPU, NCCL on CUDA) that rendezvous on a free loopback port picked at start. Every rank
gets the same plan over its own pipe and runs the forward pass; only rank 0 sends results.
Messages are tuples `(kind, payload)`:

    parent -> worker: ("step", StepPlan) | ("stop", None)
    worker -> parent: ("progress", (fraction, message)) | ("ready", WorkerInfo)
                      | ("result", StepResult, rank 0 only) | ("error", traceback text)

The parent watches every rank: an error message or an exit from any of them marks the
engine dead (`EngineDeadError`) and the remaining ranks are killed, so a collective that
waits for a dead peer never hangs the server.

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
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
import torch.multiprocessing as mp

from engine.config import WARMUP_STEPS, WARMUP_TIMEOUT_FACTOR, EngineConfig
from engine.errors import EngineDeadError
from engine.gc_tuning import freeze_startup_objects, unfreeze
from engine.plan import StepPlan, StepResult, WorkerInfo
from engine.transfer import host_wait_allowed, sync_debug

logger = logging.getLogger(__name__)

ProgressFn = Callable[[float, str], None]


def _watch_parent(parent_pid: int) -> None:
    """Exit when the server process is gone, so no worker is ever orphaned."""
    import time

    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            os._exit(1)


def _worker_main(
    conn: Connection,
    config: EngineConfig,
    model_path: str,
    parent_pid: int,
    rank: int = 0,
    port: int = 0,
) -> None:
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    tp_size = config.tensor_parallel_size
    try:
        from engine.distributed import init_tensor_parallel
        from engine.layers.backend import select_backend
        from engine.model_runner import ModelRunner
        from engine.models.loader import load_hf_config, load_model

        device = config.resolved_device()
        if device == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp_size))
        init_tensor_parallel(rank, tp_size, port, device)  # nothing at tp=1
        if tp_size == 1 and device.startswith("cuda:"):
            torch.cuda.set_device(device)  # events and pinned copies follow the current device
        select_backend(device, config.attention_backend)  # once, before the model exists
        conn.send(("progress", (0.1, "loading weights")))
        hf_config = load_hf_config(model_path)
        model = load_model(model_path, config.torch_dtype(), device, tp_rank=rank, tp_size=tp_size)
        if config.weight_quantization != "none":
            from engine.layers.cpu_gemm import quantize_model_weights

            quantize_model_weights(model, config.weight_quantization)
        conn.send(("progress", (0.8, "allocating KV cache")))
        runner = ModelRunner(config, model, hf_config)
        freeze_startup_objects()
        conn.send(("ready", runner.info()))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    try:
        _serve_steps(conn, runner, rank, config.resolved_launch_ahead(), config.check_launch_syncs)
    finally:
        unfreeze()


def _serve_steps(conn: Connection, runner: Any, rank: int, launch_ahead: bool, check_syncs: bool = False) -> None:
    """Answer step plans until told to stop, the pipe closes, or a step fails.

    With `launch_ahead` (`EngineConfig.launch_ahead`: on a GPU with overlapped scheduling) a
    step's tokens are not waited for before the next plan is read: overlapped scheduling sends
    that plan while the step runs, and the next step is launched at once, so the host reads the
    plan and prepares its inputs while the GPU computes, instead of the GPU waiting for the host
    between steps. The pending step's result goes out as soon as the next step's forward pass
    is queued (before its sampling, which may need those tokens), or when the step ends with no
    plan waiting. Without, each step is finished before the next plan is read.

    `check_syncs` (`EngineConfig.check_launch_syncs`, a GPU): a launch that waits for the GPU
    raises, except in sending the previous result and in reading prompt logprobs back.
    """
    # The launched step whose result is not sent yet: (step, when it was launched, how long the
    # worker waited for its plan with nothing of its own on the device).
    pending: tuple[Any, float, float] | None = None
    # On the CPU a launched step is always done; launching ahead there (tests) keeps each result
    # for the next launch all the same, as a GPU step still running would be.
    on_gpu = str(runner.device).startswith("cuda")
    check = "error" if check_syncs and on_gpu else None
    last_done = 0.0  # when the previous step's tokens were in
    # A thread waits for each launched step's tokens and writes a byte to `ready_w` then, so the
    # loop can wait for the next plan or for the pending step's end, whichever comes first.
    ready_r, ready_w = os.pipe()
    os.set_blocking(ready_r, False)
    os.set_blocking(ready_w, False)
    watched: queue.SimpleQueue[Any] = queue.SimpleQueue()

    gpu_index = torch.cuda.current_device() if on_gpu else None  # this rank's, set at start-up

    def watch() -> None:
        if gpu_index is not None:
            torch.cuda.set_device(gpu_index)  # a new thread's current device is 0
        try:
            while (step := watched.get()) is not None:
                with contextlib.suppress(BaseException):  # finish() raises it again, where it is reported
                    step.wait()
                with contextlib.suppress(OSError):  # a full pipe already says so; or the loop is gone
                    os.write(ready_w, b"\0")
        finally:
            os.close(ready_w)

    if launch_ahead:
        threading.Thread(target=watch, daemon=True, name="lightgate-step-watch").start()

    def send(step: Any, launched: float, waited: float, ahead: bool = False) -> None:
        nonlocal last_done
        result = step.finish()
        # From its launch, or from the previous step's end when it was launched behind it, to
        # its tokens: the device's time for it (and, launched ahead, the next step's launch).
        done = time.perf_counter()
        result.execute_seconds = done - max(launched, last_done)
        last_done = done
        result.wait_seconds = waited
        result.launched_ahead = ahead
        if rank == 0:
            conn.send(("result", result))

    try:
        while True:
            idle_since: float | None = time.perf_counter()
            try:
                while pending is not None:  # until the next plan, or the pending step's end
                    if conn in wait([conn, ready_r]):
                        idle_since = None  # the device still has the pending step
                        break
                    with contextlib.suppress(BlockingIOError):
                        os.read(ready_r, 4096)  # steps' ends: maybe of ones already sent
                    if pending[0].done():
                        send(*pending)
                        pending = None
                        idle_since = time.perf_counter()
                kind, payload = conn.recv()
            except (EOFError, OSError):
                return
            except BaseException:  # a failed step found while waiting, or a plan that does not unpickle
                with contextlib.suppress(OSError):
                    conn.send(("error", traceback.format_exc()))
                return
            if kind == "stop":
                return
            try:
                start = time.perf_counter()
                if on_gpu and pending is not None and pending[0].done():  # its tokens are in: why hold it
                    send(*pending)
                    pending = None
                previous = pending
                waited = 0.0 if idle_since is None or previous is not None else start - idle_since

                def send_previous(previous: tuple[Any, float, float] | None = previous) -> None:
                    if previous is not None:
                        with host_wait_allowed():
                            send(*previous, ahead=True)

                with sync_debug(check):
                    step = runner.launch(payload, on_forward_queued=send_previous)
                pending = (step, start, waited)
                if launch_ahead:
                    watched.put(step)
                else:
                    send(*pending)
                    pending = None
            except BaseException:
                conn.send(("error", traceback.format_exc()))
                return
    finally:
        watched.put(None)  # the watcher closes its end
        os.close(ready_r)
        if not launch_ahead:
            os.close(ready_w)


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
                target=_worker_main,
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
        self.info: WorkerInfo | None = None
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
    def _conn(self) -> Connection:
        return self._conns[0]

    @property
    def _proc(self) -> Any:
        return self._procs[0]

    @property
    def pids(self) -> list[int | None]:
        return [p.pid for p in self._procs]

    def wait_ready(self, progress: ProgressFn | None = None) -> WorkerInfo:
        while not self._ready[0]:
            kind, payload = self._recv()
            if kind == "progress":
                if progress is not None:
                    progress(*payload)
            elif kind == "ready":
                self.info = payload
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
        assert self.info is not None
        return self.info

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

    def execute(self, plan: StepPlan) -> StepResult:
        self.send_step(plan)
        return self.recv_result()

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
