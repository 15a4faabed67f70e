"""SSE framing and disconnects, against a scripted ASGI receive/send."""

from __future__ import annotations

import asyncio
from typing import Any

from openai_compat.sse import DONE, RAW_SEND, DirectWriter, PushSSEResponse, format_event


def test_framing() -> None:
    assert format_event('{"a": "é"}') == 'data: {"a": "é"}\n\n'.encode()
    assert DONE == b"data: [DONE]\n\n"


async def test_stream_sends_events_and_headers() -> None:
    sent: list[dict[str, Any]] = []
    never: asyncio.Event = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await never.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    def start(writer: DirectWriter) -> None:
        writer.write(format_event("{}"))
        writer.end(DONE)

    async def cleanup() -> None:
        pass

    await PushSSEResponse(start, cleanup)({"type": "http"}, receive, send)
    headers = dict(sent[0]["headers"])
    assert headers[b"content-type"].startswith(b"text/event-stream")
    assert headers[b"cache-control"] == b"no-cache" and headers[b"x-accel-buffering"] == b"no"
    assert [m.get("body") for m in sent[1:]] == [b"data: {}\n\n", DONE]
    assert sent[-1]["more_body"] is False


async def test_cleanup_runs_when_the_client_left_before_the_first_event() -> None:
    cleaned: list[str] = []
    started: list[DirectWriter] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await asyncio.sleep(1)  # the client is gone before the headers are out

    async def cleanup() -> None:
        cleaned.append("cleanup")

    await asyncio.wait_for(PushSSEResponse(started.append, cleanup)({"type": "http"}, receive, send), 2)
    assert cleaned == ["cleanup"]
    assert started == []  # nothing was pushed to a response that never started


# -- pushed streams: events written from callbacks, without a producer task -------------------


async def test_push_response_writes_from_callbacks_in_order_and_ends() -> None:
    sent: list[dict[str, Any]] = []
    cleaned: list[str] = []
    never: asyncio.Event = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await never.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:  # completes without suspending, as a socket write does
        sent.append(message)

    def start(writer: DirectWriter) -> None:
        writer.write(format_event("0"))  # synchronously, then from later callbacks
        loop = asyncio.get_running_loop()
        loop.call_soon(writer.write, format_event("1"))
        loop.call_later(0.01, writer.end, DONE)
        loop.call_later(0.02, writer.write, format_event("late"))  # after the end: dropped

    async def cleanup() -> None:
        cleaned.append("cleanup")

    await asyncio.wait_for(PushSSEResponse(start, cleanup)({"type": "http"}, receive, send), 2)
    assert sent[0]["type"] == "http.response.start"
    assert [(m["body"], m["more_body"]) for m in sent[1:]] == [
        (b"data: 0\n\n", True), (b"data: 1\n\n", True), (DONE, False)
    ]
    assert cleaned == ["cleanup"]
    await asyncio.sleep(0.02)
    assert len(sent) == 4


async def test_push_response_uses_the_servers_own_send_for_the_body() -> None:
    wrapped: list[str] = []
    raw: list[bytes] = []

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()
        return {}

    async def send(message: dict[str, Any]) -> None:
        wrapped.append(message["type"])

    async def raw_send(message: dict[str, Any]) -> None:
        raw.append(message["body"])

    def start(writer: DirectWriter) -> None:
        writer.write(b"a")
        writer.end(b"b")

    async def cleanup() -> None:
        pass

    await PushSSEResponse(start, cleanup)({"type": "http", RAW_SEND: raw_send}, receive, send)
    assert wrapped == ["http.response.start"] and raw == [b"a", b"b"]


async def test_a_paused_write_holds_the_next_ones_which_follow_as_one_message() -> None:
    # The transport is paused (a slow reader): the first write's send waits; what is written
    # meanwhile goes out after it, in order, in one message, and the end comes last.
    sent: list[tuple[bytes, bool]] = []
    resume = asyncio.Event()
    paused = True

    async def send(message: dict[str, Any]) -> None:
        nonlocal paused
        if paused:
            paused = False
            await resume.wait()
        sent.append((message["body"], message["more_body"]))

    writer = DirectWriter(send)
    writer.write(b"1")  # pauses
    writer.write(b"2")
    writer.write(b"3")
    writer.end(b"4")
    writer.write(b"5")  # after the end: dropped
    assert sent == [] and not writer.done.done()
    resume.set()
    await asyncio.wait_for(writer.done, 2)
    assert sent == [(b"1", True), (b"234", False)]


async def test_a_failing_send_fails_the_stream() -> None:
    async def send(message: dict[str, Any]) -> None:
        raise OSError("connection reset")

    writer = DirectWriter(send)
    writer.write(b"1")
    assert writer.done.done() and isinstance(writer.done.exception(), OSError)
    writer.write(b"2")  # nothing more is attempted


async def test_push_response_stops_writing_when_the_client_leaves() -> None:
    cleaned: list[str] = []
    writes: list[int] = []

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(0.05)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        pass

    def start(writer: DirectWriter) -> None:
        def tick(i: int) -> None:  # an engine that keeps producing until the request is aborted
            if cleaned:
                return
            writes.append(i)
            writer.write(format_event(str(i)))
            if i < 1000:
                asyncio.get_running_loop().call_later(0.01, tick, i + 1)

        tick(0)

    async def cleanup() -> None:  # the real one aborts the engine request
        cleaned.append("cleanup")

    await asyncio.wait_for(PushSSEResponse(start, cleanup)({"type": "http"}, receive, send), 2)
    assert cleaned == ["cleanup"] and len(writes) < 20
