"""The model worker process and the server process's handle on it.

The worker loads the model, allocates the KV pool, reports `WorkerInfo`, then answers one
`StepPlan` with one `StepResult` over a pipe until it is told to stop or its parent dies.
Messages are tuples `(kind, payload)`:

    parent -> worker: ("step", StepPlan) | ("stop", None)
    worker -> parent: ("progress", (fraction, message)) | ("ready", WorkerInfo)
                      | ("result", StepResult) | ("error", traceback text)
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.multiprocessing as mp

from engine.config import EngineConfig
from engine.errors import EngineDeadError
from engine.plan import StepPlan, StepResult, WorkerInfo

logger = logging.getLogger(__name__)

ProgressFn = Callable[[float, str], None]


def _watch_parent(parent_pid: int) -> None:
    """Exit when the server process is gone, so no worker is ever orphaned."""
    import time

    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            os._exit(1)


def _worker_main(conn: Connection, config: EngineConfig, model_path: str, parent_pid: int) -> None:
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    try:
        from engine.layers.backend import select_backend
        from engine.model_runner import ModelRunner
        from engine.models.loader import load_hf_config, load_model

        if config.resolved_device() == "cpu":
            torch.set_num_threads(max(1, os.cpu_count() or 1))
        select_backend(config.resolved_device(), config.attention_backend)  # once, before the model exists
        conn.send(("progress", (0.1, "loading weights")))
        hf_config = load_hf_config(model_path)
        model = load_model(model_path, config.torch_dtype(), config.resolved_device())
        conn.send(("progress", (0.8, "allocating KV cache")))
        runner = ModelRunner(config, model, hf_config)
        conn.send(("ready", runner.info()))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError):
            return
        if kind == "stop":
            return
        try:
            conn.send(("result", runner.execute(payload)))
        except BaseException:
            conn.send(("error", traceback.format_exc()))
            return


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
    """Starts a worker process and exchanges plans and results with it."""

    def __init__(self, config: EngineConfig, model_path: str) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe(duplex=True)
        self._proc = ctx.Process(
            target=_worker_main,
            args=(child_conn, config, model_path, os.getpid()),
            name="lightgate-worker",
            daemon=True,
        )
        with _main_module_hidden():
            self._proc.start()
        child_conn.close()
        self.info: WorkerInfo | None = None
        self.dead_reason: str | None = None

    def wait_ready(self, progress: ProgressFn | None = None) -> WorkerInfo:
        while True:
            kind, payload = self._recv()
            if kind == "progress":
                if progress is not None:
                    progress(*payload)
            elif kind == "ready":
                self.info = payload
                return payload
            else:
                raise self._died(f"the worker failed to start:\n{payload}")

    def send_step(self, plan: StepPlan) -> None:
        try:
            self._conn.send(("step", plan))
        except (OSError, ValueError) as e:
            raise self._died(f"the worker is gone: {e}") from e

    def recv_result(self) -> StepResult:
        kind, payload = self._recv()
        if kind != "result":
            raise self._died(f"the worker failed:\n{payload}")
        return payload

    def execute(self, plan: StepPlan) -> StepResult:
        self.send_step(plan)
        return self.recv_result()

    def _recv(self) -> tuple[str, Any]:
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        try:
            return self._conn.recv()
        except (EOFError, OSError) as e:
            code = self._proc.exitcode if not self._proc.is_alive() else None
            raise self._died(f"the worker process exited (exit code {code})") from e

    def _died(self, reason: str) -> EngineDeadError:
        self.dead_reason = reason
        logger.error(reason)
        return EngineDeadError(reason)

    @property
    def alive(self) -> bool:
        return self.dead_reason is None and self._proc.is_alive()

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def shutdown(self, timeout: float = 5.0) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send(("stop", None))
            except (OSError, ValueError):
                pass
            self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout)
        self._conn.close()
