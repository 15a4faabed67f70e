"""A model worker process (one per tensor-parallel rank): load, then answer step plans.

A worker loads the model, allocates the KV pool, reports `WorkerInfo`, then answers one
`StepPlan` with one `StepResult` over a pipe until it is told to stop or its parent dies.
With `tensor_parallel_size=N` there are N workers, ranks 0..N-1 of one process group (gloo
on CPU, NCCL on CUDA) that rendezvous on a free loopback port picked at start. Every rank
gets the same plan over its own pipe and runs the forward pass; only rank 0 sends results.
Messages are tuples `(kind, payload)`:

    parent -> worker: ("step", StepPlan) | ("stop", None)
    worker -> parent: ("progress", (fraction, message)) | ("ready", WorkerInfo)
                      | ("result", StepResult, rank 0 only) | ("error", traceback text)

The server process's side is `engine.worker_client.WorkerClient`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

import torch

from engine.config import EngineConfig
from engine.gc_tuning import freeze_startup_objects, unfreeze
from engine.worker.transfer import host_wait_allowed, sync_debug

logger = logging.getLogger(__name__)

ProgressFn = Callable[[float, str], None]


def _watch_parent(parent_pid: int) -> None:
    """Exit when the server process is gone, so no worker is ever orphaned."""
    import time

    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            os._exit(1)


def worker_main(
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
        from engine.models.loader import load_hf_config, load_model
        from engine.worker.model_runner import ModelRunner

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
            from engine.models.quantize import quantize_model_weights

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
