"""Server-sent events in OpenAI's exact framing, and client disconnects turned into aborts.

A stream is `data: {json}\\n\\n` events and nothing else (no comments, no `event:` lines),
ending with `data: [DONE]\\n\\n`. While the response streams, a second task waits for the
ASGI `http.disconnect` message; when the client hangs up it cancels the producer, whose
`finally` blocks close the engine streams, which aborts the requests and frees their KV.
`run_until_disconnect` does the same for work done before a response starts (non-streaming
generation, or waiting for the first token of a long prefill).

The framing is written here rather than with sse-starlette: that package cancels every open
stream as soon as the server is asked to stop, while a graceful shutdown here lets running
streams finish (and its defaults, `\\r\\n` separators and keep-alive comments, differ from
OpenAI's framing).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TypeVar

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

T = TypeVar("T")

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}


def format_event(data: str) -> bytes:
    """One SSE event carrying `data` (a JSON document: it never contains a newline)."""
    return b"data: " + data.encode("utf-8") + b"\n\n"


class ClientDisconnected(Exception):
    """The client closed the connection before the response was complete."""


async def wait_for_disconnect(receive: Receive) -> None:
    """Return when the client hangs up. Call only after the request body was read."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def run_until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client hangs up first, cancel it and raise `ClientDisconnected`."""
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(wait_for_disconnect(request.receive))
    try:
        done, _ = await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        await _cancel(work_task)
        raise
    finally:
        watch_task.cancel()
    if work_task in done:
        return work_task.result()
    await _cancel(work_task)
    raise ClientDisconnected()


async def _cancel(task: asyncio.Future[T]) -> None:
    """Cancel `task` and wait until its cleanup (engine aborts) has run."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


class SSEResponse(Response):
    """Streams already framed events (bytes); the producer is cancelled when the client leaves."""

    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncIterator[bytes],
        cleanup: Callable[[], Awaitable[None]] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.events = events
        # Runs however the stream ends, also when the client left before the producer started
        # (then its own `finally` never runs).
        self.cleanup = cleanup
        self.status_code = 200
        self.background = None
        self.init_headers({**SSE_HEADERS, **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream_task = asyncio.ensure_future(self._stream(send))
        watch_task = asyncio.ensure_future(wait_for_disconnect(receive))
        try:
            await asyncio.wait({stream_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch_task.cancel()
            if not stream_task.done():
                await _cancel(stream_task)  # the client left: stop producing
            await self._close()
        error = stream_task.exception() if not stream_task.cancelled() else None
        if error is not None:
            raise error

    async def _stream(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for event in self.events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _close(self) -> None:
        """Finish the producer (its `finally` blocks abort the engine requests), then clean up."""
        with contextlib.suppress(Exception):
            await self.events.aclose()  # type: ignore[attr-defined]
        if self.cleanup is not None:
            await self.cleanup()
