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
from functools import partial
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from engine.config import EngineConfig
from engine.gc_tuning import freeze_startup_objects, unfreeze
from engine.worker.cpu_threads import worker_threads
from engine.worker.transfer import host_wait_allowed, sync_debug

if TYPE_CHECKING:
    from engine.grammar import GrammarCompiler
    from engine.messages import StepPlan
    from engine.worker.model_runner import ModelRunner
    from engine.worker.pending_step import PendingStep

logger = logging.getLogger(__name__)

ProgressFn = Callable[[float, str], None]


def _watch_parent(parent_pid: int) -> None:
    """Exit when the server process is gone, so no worker is ever orphaned."""
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
        from engine.tokenizer import has_tokenizer
        from engine.worker.grammar_masks import GrammarMasks
        from engine.worker.model_runner import ModelRunner

        device = config.resolved_device()
        threads = worker_threads(tp_size)  # (engine/worker/cpu_threads.py: how a user pins them)
        if device == "cpu":
            torch.set_num_threads(threads)
            with contextlib.suppress(RuntimeError):  # nothing here runs inter-op work: no idle pool
                torch.set_num_interop_threads(1)
        init_tensor_parallel(rank, tp_size, port, device)  # nothing at tp=1
        if tp_size == 1 and device.startswith("cuda:"):
            torch.cuda.set_device(device)  # events and pinned copies follow the current device
        select_backend(device, config.attention_backend, config.decode_gemv)  # once, before the model exists
        conn.send(("progress", (0.1, "loading weights")))
        hf_config = load_hf_config(model_path)
        # --weight-quantization requantizes float weights: a GGUF's come dequantized then.
        gguf_weights = config.gguf_weights if config.weight_quantization == "none" else "dequantized"
        model = load_model(
            model_path, config.torch_dtype(), device, tp_rank=rank, tp_size=tp_size, quantization=config.quantization,
            gguf_weights=gguf_weights, gguf_prefill=config.gguf_prefill, gguf_activations=config.gguf_activations,
        )
        if config.weight_quantization != "none":
            from engine.models.quantize import quantize_model_weights

            quantize_model_weights(model, config.weight_quantization)
        conn.send(("progress", (0.8, "allocating KV cache")))
        grammar = GrammarMasks(device, num_threads=threads)
        runner = ModelRunner(config, model, hf_config, grammar, model_path=model_path)
        freeze_startup_objects()
        conn.send(("ready", runner.info()))
        if has_tokenizer(config.tokenizer or model_path):  # constrained decoding needs one
            grammar.start(partial(_grammar_compiler, config, model_path, hf_config))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    try:
        StepLoop(conn, runner, rank, config.resolved_launch_ahead(), config.check_launch_syncs).run()
    finally:
        unfreeze()


def _grammar_compiler(config: EngineConfig, model_path: str, hf_config: Any) -> GrammarCompiler:
    """The worker's grammar compiler: the tokenizer, end ids and logits width of the server's
    (engine_core.py), so that both compile a constraint alike."""
    from engine.grammar.compiler import model_compiler
    from engine.model_config import ModelConfig
    from engine.tokenizer import eos_token_ids, load_tokenizer

    tokenizer = load_tokenizer(config.tokenizer or model_path)
    eos = eos_token_ids(model_path, hf_config, tokenizer)
    return model_compiler(tokenizer, ModelConfig.from_hf_config(hf_config).vocab_size, eos)


class _Launched(NamedTuple):
    """A launched step whose result is not sent yet."""

    step: PendingStep
    launched: float  # when it was launched
    waited: float  # how long the worker waited for its plan with nothing of its own on the device


class StepLoop:
    """Answers step plans until told to stop, the pipe closes, or a step fails (`run`, once).

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

    def __init__(
        self, conn: Connection, runner: ModelRunner, rank: int, launch_ahead: bool, check_syncs: bool = False
    ) -> None:
        self.conn = conn
        self.runner = runner
        self.rank = rank
        self.launch_ahead = launch_ahead
        # On the CPU a launched step is always done; launching ahead there (tests) keeps each
        # result for the next launch all the same, as a GPU step still running would be.
        self.on_gpu = str(runner.device).startswith("cuda")
        self.check = "error" if check_syncs and self.on_gpu else None
        self.gpu_index = torch.cuda.current_device() if self.on_gpu else None  # this rank's, set at start-up
        self.pending: _Launched | None = None
        self.idle_since: float | None = None  # since when the device has nothing of this worker's
        self.last_done = 0.0  # when the previous step's tokens were in
        # A thread waits for each launched step's tokens and writes a byte to `ready_w` then, so
        # the loop can wait for the next plan or for the pending step's end, whichever comes first.
        self.ready_r, self.ready_w = os.pipe()
        os.set_blocking(self.ready_r, False)
        os.set_blocking(self.ready_w, False)
        self.watched: queue.SimpleQueue[PendingStep | None] = queue.SimpleQueue()

    def run(self) -> None:
        if self.launch_ahead:
            threading.Thread(target=self._watch, daemon=True, name="lightgate-step-watch").start()
        try:
            while (message := self._wait_for_plan()) is not None:
                kind, plan = message
                if kind == "stop" or not self._launch(plan):
                    return
        finally:
            self.watched.put(None)  # the watcher closes its end
            os.close(self.ready_r)
            if not self.launch_ahead:
                os.close(self.ready_w)

    def _watch(self) -> None:
        """The watcher thread: a byte to `ready_w` as each launched step's tokens are in."""
        if self.gpu_index is not None:
            torch.cuda.set_device(self.gpu_index)  # a new thread's current device is 0
        try:
            while (step := self.watched.get()) is not None:
                with contextlib.suppress(BaseException):  # finish() raises it again, where it is reported
                    step.wait()
                with contextlib.suppress(OSError):  # a full pipe already says so; or the loop is gone
                    os.write(self.ready_w, b"\0")
        finally:
            os.close(self.ready_w)

    def _wait_for_plan(self) -> tuple[str, Any] | None:
        """The next message, sending the pending step's result meanwhile if its tokens come
        first; None once the pipe closed or a failure was reported."""
        self.idle_since = time.perf_counter()
        try:
            while self.pending is not None:  # until the next plan, or the pending step's end
                if self.conn in wait([self.conn, self.ready_r]):
                    self.idle_since = None  # the device still has the pending step
                    break
                with contextlib.suppress(BlockingIOError):
                    os.read(self.ready_r, 4096)  # steps' ends: maybe of ones already sent
                if self.pending.step.done():
                    self._send_pending()
                    self.idle_since = time.perf_counter()
            message: tuple[str, Any] = self.conn.recv()
            return message
        except (EOFError, OSError):
            return None
        except BaseException:  # a failed step found while waiting, or a plan that does not unpickle
            with contextlib.suppress(OSError):
                self.conn.send(("error", traceback.format_exc()))
            return None

    def _launch(self, plan: StepPlan) -> bool:
        """Launch the plan's step; the pending one's result goes out once this one's forward
        pass is queued. False once a failure was reported."""
        try:
            start = time.perf_counter()
            if self.on_gpu and self.pending is not None and self.pending.step.done():
                self._send_pending()  # its tokens are in: why hold it
            previous = self.pending
            idle_since = self.idle_since
            waited = 0.0 if idle_since is None or previous is not None else start - idle_since
            with sync_debug(self.check):
                step = self.runner.launch(plan, on_forward_queued=partial(self._send_ahead, previous))
            self.pending = _Launched(step, start, waited)
            if self.launch_ahead:
                self.watched.put(step)
            else:
                self._send_pending()
        except BaseException:
            self.conn.send(("error", traceback.format_exc()))
            return False
        return True

    def _send_ahead(self, previous: _Launched | None) -> None:
        if previous is not None:
            with host_wait_allowed():
                self._send(previous, ahead=True)

    def _send_pending(self) -> None:
        assert self.pending is not None
        self._send(self.pending)
        self.pending = None

    def _send(self, launched: _Launched, ahead: bool = False) -> None:
        result = launched.step.finish()
        # From its launch, or from the previous step's end when it was launched behind it, to
        # its tokens: the device's time for it (and, launched ahead, the next step's launch).
        done = time.perf_counter()
        result.execute_seconds = done - max(launched.launched, self.last_done)
        self.last_done = done
        result.wait_seconds = launched.waited
        result.launched_ahead = ahead
        if self.rank == 0:
            self.conn.send(("result", result))
