"""Server-sent events in OpenAI's exact framing, and client disconnects turned into aborts.

A stream is `data: {json}\\n\\n` events and nothing else (no comments, no `event:` lines),
ending with `data: [DONE]\\n\\n`.

`PushSSEResponse` streams without a producer task: the engine loop hands each step's outputs
to the stream (`GenerationStream.push`), which writes their events at once through a
`DirectWriter`. At hundreds of streams this is most of the event loop's work per step, and a
task woken per stream per token costs more than the write itself. While the response streams,
a second task waits for the ASGI `http.disconnect` message; when the client hangs up the
writer stops and the cleanup closes the engine streams, which aborts the requests and frees
their KV. `run_until_disconnect` does the same for work done before a response starts
(non-streaming generation, or waiting for the first token of a long prefill).

The framing is written here rather than with sse-starlette: that package cancels every open
stream as soon as the server is asked to stop, while a graceful shutdown here lets running
streams finish (and its defaults, `\\r\\n` separators and keep-alive comments, differ from
OpenAI's framing).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, TypeVar, cast

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

T = TypeVar("T")

DONE = b"data: [DONE]\n\n"
# The scope key of the server's own `send` (the app puts it there): `PushSSEResponse` sends its
# body through it, past the middleware's wrappers, which look at a response's start only.
RAW_SEND = "lightgate.raw_send"
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


class DirectWriter:
    """Writes a response's body messages through the ASGI `send` without a task of its own.

    Each write runs `send` in the caller's frame until it returns, which it does at once unless
    the transport is paused (the client reads slower than the stream writes): then a task
    finishes that write, and later writes wait in order and go out as one message. `done`
    resolves once the last message (`end`) is sent, or with the error `send` raised.
    """

    def __init__(self, send: Send) -> None:
        # ASGI servers implement `send` as an async function: each call is a coroutine to step.
        self._send = cast("Callable[[Message], Coroutine[Any, Any, None]]", send)
        self._waiting: list[bytes] = []  # behind a paused write
        self._ending = False
        self._task: asyncio.Task[None] | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def write(self, event: bytes) -> None:
        if self._ending or self.done.done():
            return
        if self._task is not None:
            self._waiting.append(event)
        else:
            self._run(event, more_body=True)

    def end(self, event: bytes = b"") -> None:
        """Write `event`, if any, as the body's last message."""
        if self._ending or self.done.done():
            return
        self._ending = True
        if self._task is not None:
            self._waiting.append(event)
        else:
            self._run(event, more_body=False)

    def _run(self, body: bytes, more_body: bool) -> None:
        coro = self._send({"type": "http.response.body", "body": body, "more_body": more_body})
        try:
            waiting_on = coro.send(None)
        except StopIteration:
            if not more_body and not self.done.done():
                self.done.set_result(None)
            return
        except BaseException as e:  # noqa: BLE001 - the connection failed: nothing more to write
            self._fail(e)
            return
        self._task = asyncio.ensure_future(self._finish(coro, waiting_on, more_body))

    async def _finish(self, coro: Any, waiting_on: Any, more_body: bool) -> None:
        """Resume the paused `send` as a task would, then send what queued behind it."""
        try:
            while True:
                error: BaseException | None = None
                try:
                    if waiting_on is None:  # a bare yield: one turn of the loop
                        await asyncio.sleep(0)
                    else:
                        await waiting_on
                except BaseException as e:  # noqa: BLE001 - handed to the send coroutine, as a task does
                    error = e
                try:
                    waiting_on = coro.throw(error) if error is not None else coro.send(None)
                except StopIteration:
                    break
            while self._waiting:
                body, self._waiting = b"".join(self._waiting), []
                more_body = not self._ending or bool(self._waiting)
                await self._send({"type": "http.response.body", "body": body, "more_body": more_body})
        except BaseException as e:  # noqa: BLE001
            self._fail(e)
            if isinstance(e, asyncio.CancelledError):
                raise
            return
        finally:
            self._task = None
        if not more_body and not self.done.done():
            self.done.set_result(None)

    def _fail(self, error: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(error)
            self.done.exception()  # retrieved: the response reads it, or gives up on the stream

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()


class PushSSEResponse(Response):
    """Streams events written by `start(writer)`: it writes them with `writer.write` and ends the
    body with `writer.end` from any callback (the engine loop's); `cleanup` runs however the
    stream ends (the client leaving too: then before it, the writer stops)."""

    media_type = "text/event-stream"

    def __init__(
        self,
        start: Callable[[DirectWriter], None],
        cleanup: Callable[[], Awaitable[None]],
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.start = start
        self.cleanup = cleanup
        self.status_code = 200
        self.background = None
        self.init_headers({**SSE_HEADERS, **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watch_task = asyncio.ensure_future(wait_for_disconnect(receive))
        writer: DirectWriter | None = None
        try:
            head = asyncio.ensure_future(
                send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            )
            await asyncio.wait({head, watch_task}, return_when=asyncio.FIRST_COMPLETED)
            if not head.done():  # the client left before the headers were out
                await _cancel(head)
                return
            head.result()
            writer = DirectWriter(scope.get(RAW_SEND, send))
            self.start(writer)
            await asyncio.wait({writer.done, watch_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch_task.cancel()
            if writer is not None and not writer.done.done():
                writer.cancel()  # the client left (or this task was cancelled): stop writing
            await self.cleanup()
        if writer.done.done() and writer.done.exception() is not None:
            raise writer.done.exception()  # type: ignore[misc]
