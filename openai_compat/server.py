"""`lightgate serve`: uvicorn around the app, a load progress bar, graceful SIGTERM.

On SIGTERM (or Ctrl-C) the server stops accepting connections, answers 503 to new requests
on open ones, lets running requests finish for up to `shutdown_timeout` seconds, aborts the
rest, shuts the engine down and exits 0. A second Ctrl-C forces the exit.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Callable, Generator
from types import FrameType

import uvicorn
from tqdm import tqdm

from engine.gc_tuning import freeze_startup_objects, unfreeze
from openai_compat.app import build_app
from openai_compat.config import Settings
from openai_compat.serving_base import ServerState

logger = logging.getLogger("lightgate")


class LoadProgress:
    """The engine's progress(fraction, message) callback drawn as a tqdm bar on stderr."""

    def __init__(self) -> None:
        self._bar: tqdm | None = None
        self._lock = threading.Lock()  # called from the loader's thread

    def __call__(self, fraction: float, message: str) -> None:
        with self._lock:
            if self._bar is None:
                self._bar = tqdm(total=100, file=sys.stderr, bar_format="Loading model: {percentage:3.0f}%|{bar}| {desc}")
            self._bar.n = round(max(0.0, min(1.0, fraction)) * 100)
            self._bar.set_description_str(message, refresh=True)

    def close(self) -> None:
        with self._lock:
            if self._bar is not None:  # None when the engine reported no progress
                self._bar.close()
                self._bar = None


class GracefulServer(uvicorn.Server):
    """uvicorn's server, marking the app as draining on the first signal and exiting 0 after it."""

    def __init__(self, config: uvicorn.Config, on_exit_signal: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit_signal = on_exit_signal

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_exit_signal()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # uvicorn re-raises the caught signal once it has shut down, which would end the
        # process "killed by SIGTERM"; a server that drained cleanly exits 0 instead.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def serve(settings: Settings) -> int:
    """Run the server until it is stopped; the process exit status."""
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    progress = LoadProgress()
    server: GracefulServer | None = None
    url = f"http://{settings.host}:{settings.port}"

    def on_loaded(state: ServerState) -> None:
        progress(1.0, "ready")
        progress.close()
        stats = state.engine.stats()
        logger.info(
            "lightgate serving %s at %s/v1 (KV cache capacity %d tokens, max_model_len %d)",
            state.served_model_name, url, stats.kv_cache_capacity_tokens, state.engine.max_model_len,
        )
        freeze_startup_objects()

    def on_load_failed(error: BaseException) -> None:
        progress.close()
        if server is not None:
            server.should_exit = True

    app = build_app(settings, progress=progress, on_loaded=on_loaded, on_load_failed=on_load_failed)
    state: ServerState = app.state.server

    def start_draining() -> None:
        if not state.draining:
            state.draining = True
            logger.info("shutting down: finishing running requests (up to %.0f s)", settings.shutdown_timeout)

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        timeout_graceful_shutdown=max(1, round(settings.shutdown_timeout)),
        lifespan="on",
    )
    server = GracefulServer(config, start_draining)
    server.run()
    unfreeze()
    return 1 if state.load_error is not None or state.engine.errored else 0
