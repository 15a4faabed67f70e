"""`LocalWorker`: the worker's `ModelRunner` in the test's own process, in place of `WorkerClient`'s
worker processes (`in_process_workers`), so a test can look at what the worker did: the real
model object, its calls counted.

The same model runner over the same loaded model as a worker process: `load_model`, then
`ModelRunner`, each plan executed when it is sent and its result kept until asked for (a worker
without `launch_ahead`: the CPU's).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator
from typing import Any

import pytest

from engine.config import EngineConfig
from engine.messages import StepPlan, StepResult, WorkerInfo


class LocalWorker:
    last: LocalWorker | None = None  # the one the newest engine made

    def __init__(self, config: EngineConfig, model_path: str) -> None:
        from engine.layers.backend import select_backend
        from engine.models.loader import load_hf_config, load_model
        from engine.worker.model_runner import ModelRunner

        if config.tensor_parallel_size != 1:
            raise ValueError("a local worker runs tensor_parallel_size=1 only")
        device = config.resolved_device()
        select_backend(device, config.attention_backend)
        model = load_model(model_path, config.torch_dtype(), device)
        self.runner = ModelRunner(config, model, load_hf_config(model_path), model_path=model_path)
        self.results: deque[StepResult] = deque()
        self.alive = True
        self.dead_reason: str | None = None
        LocalWorker.last = self

    @property
    def model(self) -> Any:
        return self.runner.model

    def wait_ready(self, progress: Any = None) -> WorkerInfo:
        return self.runner.info()

    def send_step(self, plan: StepPlan) -> None:
        self.results.append(self.runner.execute(plan))

    def recv_result(self) -> StepResult:
        return self.results.popleft()

    def shutdown(self) -> None:
        self.alive = False


def counted_embeds(model: Any) -> list[int]:
    """The images of each of `model`'s vision tower batches from now on (the real method runs)."""
    batches: list[int] = []
    embed_images = model.embed_images

    def counted(pixels: Any, *args: Any) -> Any:
        batches.append(len(args[0]))
        return embed_images(pixels, *args)

    model.embed_images = counted
    return batches


@contextlib.contextmanager
def in_process_workers(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Engines made inside run their worker in this process (`LocalWorker.last`)."""
    import engine.engine_core

    with monkeypatch.context() as patch:
        patch.setattr(engine.engine_core, "WorkerClient", LocalWorker)
        yield
