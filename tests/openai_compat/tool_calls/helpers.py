"""Reading a whole text with a format's `CallStream`, in one piece or in chunks."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from openai_compat.tool_calls.formats import ToolFormat
from openai_compat.tool_calls.stream import CallStream, ParsedDelta

NAMES = ("get_weather", "get_time")


def chunked(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]


def read(fmt: ToolFormat, pieces: Iterable[str], names: tuple[str, ...] = NAMES,
         max_calls: int | None = None) -> tuple[str, list[tuple[str, Any]], list[ParsedDelta]]:
    """(content, [(name, arguments as parsed JSON or raw text)], the deltas) of a text."""
    stream = CallStream(fmt.syntax, names, max_calls)
    deltas = [stream.feed(piece) for piece in pieces]
    deltas.append(stream.finish())
    content = "".join(d.content for d in deltas)
    calls: dict[int, list[Any]] = {}
    for d in deltas:
        for call in d.calls:
            if call.id is not None:
                assert call.index not in calls and call.id.startswith("call_") and call.name is not None
                calls[call.index] = [call.name, ""]
            calls[call.index][1] += call.arguments
    assert sorted(calls) == list(range(len(calls)))
    return content, [(name, _maybe_json(args)) for name, args in (calls[i] for i in sorted(calls))], deltas


def _maybe_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def read_every_way(fmt: ToolFormat, text: str, **kwargs: Any) -> tuple[str, list[tuple[str, Any]]]:
    """The reading of `text`, asserted the same whole, character by character, in chunks of
    3 and 7, and split in two at every position."""
    content, calls, _ = read(fmt, [text], **kwargs)
    splits = [chunked(text, 1), chunked(text, 3), chunked(text, 7)]
    splits += [[text[:i], text[i:]] for i in range(1, len(text))]
    for pieces in splits:
        again = read(fmt, pieces, **kwargs)[:2]
        assert again == (content, calls), (pieces, again, (content, calls))
    return content, calls
