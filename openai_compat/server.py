"""`lightgate serve`: uvicorn around the app, a load progress bar, graceful SIGTERM.

On SIGTERM (or Ctrl-C) the server stops accepting connections, answers 503 to new requests
on open ones, lets running requests finish for up to `shutdown_timeout` seconds, then aborts the
rest (a stream ends with an error event and `data: [DONE]`, any other request gets a 503), shuts
the engine down and exits 0. A second Ctrl-C forces the exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Generator
from types import FrameType

import uvicorn
from tqdm import tqdm

from openai_compat.app import build_app
from openai_compat.config import Settings
from openai_compat.server_state import ServerState

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


# After the drain's time is up and the running requests are aborted, how long uvicorn still
# waits for their responses to go out before it cuts the connections (a client that stopped
# reading); ended streams write their last events at once.
_END_GRACE_S = 2
_ABORT_INTERVAL_S = 0.1


class GracefulServer(uvicorn.Server):
    """uvicorn's server, marking the app as draining on the first signal, ending what still runs
    `drain_timeout_s` after it (`end_requests`) and exiting 0 after it."""

    def __init__(
        self, config: uvicorn.Config, on_exit_signal: Callable[[], None], end_requests: Callable[[], Awaitable[None]],
        drain_timeout_s: float,
    ) -> None:
        super().__init__(config)
        self._on_exit_signal = on_exit_signal
        self._end_requests = end_requests
        self._drain_timeout_s = drain_timeout_s
        self._drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_deadline is None:
            self._drain_deadline = time.monotonic() + self._drain_timeout_s
        self._on_exit_signal()
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn waits for the open connections, then cancels their tasks: a stream cut that way
        # ends without its last bytes. The deadline comes first, and ends the requests the way
        # the app ends any aborted request.
        ending = asyncio.create_task(self._end_requests_at_deadline())
        try:
            await super().shutdown(sockets)
        finally:
            ending.cancel()

    async def _end_requests_at_deadline(self) -> None:
        deadline = self._drain_deadline if self._drain_deadline is not None else time.monotonic()
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        logger.warning("shutdown timeout: aborting the requests still running")
        while True:  # also those that reached the engine after the first pass
            await self._end_requests()
            await asyncio.sleep(_ABORT_INTERVAL_S)

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

    def on_load_failed(error: BaseException) -> None:
        progress.close()
        if server is not None:
            server.should_exit = True

    app = build_app(settings, progress=progress, on_loaded=on_loaded, on_load_failed=on_load_failed, owns_process=True)
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
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout) + _END_GRACE_S,
        lifespan="on",
    )
    server = GracefulServer(config, start_draining, state.engine.abort_all, settings.shutdown_timeout)
    server.run()
    return 1 if state.load_error is not None or state.engine.errored else 0
