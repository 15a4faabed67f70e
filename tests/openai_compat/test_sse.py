"""SSE framing and disconnects, against a scripted ASGI receive/send."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from openai_compat.sse import DONE, SSEResponse, format_event


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

    async def events() -> AsyncIterator[bytes]:
        yield format_event("{}")
        yield DONE

    await SSEResponse(events())({"type": "http"}, receive, send)
    headers = dict(sent[0]["headers"])
    assert headers[b"content-type"].startswith(b"text/event-stream")
    assert headers[b"cache-control"] == b"no-cache" and headers[b"x-accel-buffering"] == b"no"
    assert [m.get("body") for m in sent[1:]] == [b"data: {}\n\n", DONE, b""]
    assert sent[-1]["more_body"] is False


async def test_disconnect_cancels_the_producer_and_cleans_up() -> None:
    cleaned: list[str] = []
    produced: list[int] = []

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(0.05)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        pass

    async def events() -> AsyncIterator[bytes]:
        try:
            for i in range(1000):
                produced.append(i)
                await asyncio.sleep(0.01)
                yield format_event("{}")
        finally:
            cleaned.append("producer")

    async def cleanup() -> None:
        cleaned.append("cleanup")

    await asyncio.wait_for(SSEResponse(events(), cleanup=cleanup)({"type": "http"}, receive, send), 2)
    assert cleaned == ["producer", "cleanup"] and len(produced) < 20


async def test_cleanup_runs_when_the_client_left_before_the_first_event() -> None:
    cleaned: list[str] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await asyncio.sleep(1)  # the client is gone before the headers are out

    async def events() -> AsyncIterator[bytes]:
        yield DONE

    async def cleanup() -> None:
        cleaned.append("cleanup")

    await asyncio.wait_for(SSEResponse(events(), cleanup=cleanup)({"type": "http"}, receive, send), 2)
    assert cleaned == ["cleanup"]
