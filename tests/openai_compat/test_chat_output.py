"""A chat answer read for calls and thinking, as the response and as its stream of chunks.

The engine's outputs are fed to the real response builders (`_ChatEvents` for SSE chunks,
`ChoiceMessage` for the whole response) token by token as the engine hands them over; every
chunk is checked against OpenAI's spec, and the openai SDK's own stream accumulator puts the
chunks back together into the same message the non-streamed response holds.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from engine import CompletionOutput, RequestOutput, SamplingParams
from openai_compat.chat_output import ChoiceMessage, OutputReader, finish_reason_with_calls
from openai_compat.protocol import ChatCompletionRequest
from openai_compat.reasoning import THINK, Start
from openai_compat.serving_chat import ChatServing, _ChatEvents
from openai_compat.tool_calls.formats import HERMES, ToolFormat
from tests.openai_compat.openai_schema import validate

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in ("get_weather", "get_time")]


def reader(tool_format: ToolFormat | None = HERMES, thinks: bool = False) -> OutputReader:
    return OutputReader(tool_format, ("get_weather", "get_time"), None, THINK if thinks else None, Start.MAYBE)


def tokens(text: str, size: int = 3) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def outputs(pieces: list[str], reason: str = "stop") -> list[RequestOutput]:
    last = len(pieces) - 1
    return [
        RequestOutput("r", None, [1], [CompletionOutput(0, p, [7], None, reason if i == last else None)], i == last)
        for i, p in enumerate(pieces)
    ]


def stream(spec: OutputReader, pieces: list[str], reason: str = "stop") -> list[dict[str, Any]]:
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                "stream": True})
    fake_stream = SimpleNamespace(params=SamplingParams(n=1), prompt_ids=[1], num_generated_tokens=0,
                                  num_cached_tokens=0)
    events = _ChatEvents(ChatServing(None), req, fake_stream, "chatcmpl-1", spec)  # type: ignore[arg-type]
    raw = events.opening() + [e for out in outputs(pieces, reason) for e in events.events(out)]
    chunks = []
    for event in raw:
        text = event.decode()
        assert text.startswith("data: ") and text.endswith("\n\n")
        chunk = json.loads(text[6:])
        validate("CreateChatCompletionStreamResponse", chunk)
        chunks.append(chunk)
    return chunks


def whole(spec: OutputReader, pieces: list[str], reason: str = "stop") -> dict[str, Any]:
    choice, message = spec.choice(), ChoiceMessage()
    for p in pieces:
        message.add(choice.feed(p))
    message.add(choice.finish())
    out = message.message(reads_reasoning=spec.reasoning is not None).model_dump()
    return {"message": out, "finish_reason": finish_reason_with_calls(reason, choice.num_calls)}


def reassembled(chunks: list[dict[str, Any]]) -> Any:
    state: ChatCompletionStreamState[Any] = ChatCompletionStreamState(input_tools=TOOLS)  # type: ignore[arg-type]
    for chunk in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    return state.get_final_completion().choices[0]


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_calls_stream_as_openai_streams_them(size: int) -> None:
    text = "Checking.\n" + CALL + "\n" + CALL.replace("get_weather", "get_time")
    chunks = stream(reader(), tokens(text, size))
    calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks if "tool_calls" in c["choices"][0]["delta"]]
    firsts = [c for c in calls if "id" in c]
    assert [c["index"] for c in firsts] == [0, 1]
    for first in firsts:  # id, type and name on a call's first delta, its arguments after
        assert first["id"].startswith("call_") and first["type"] == "function"
        assert first["function"]["arguments"] == ""
    assert [f["function"]["name"] for f in firsts] == ["get_weather", "get_time"]
    assert all(set(c) == {"index", "function"} and set(c["function"]) == {"arguments"} for c in calls if "id" not in c)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    final = reassembled(chunks)
    assert final.finish_reason == "tool_calls" and final.message.content == "Checking."
    assert [json.loads(c.function.arguments) for c in final.message.tool_calls] == [
        {"city": "Paris", "unit": "celsius"}] * 2
    expected = whole(reader(), tokens(text, size))
    assert expected["message"]["content"] == "Checking." and expected["finish_reason"] == "tool_calls"
    assert [c["function"] for c in expected["message"]["tool_calls"]] == [
        {"name": c.function.name, "arguments": c.function.arguments} for c in final.message.tool_calls
    ]


def test_only_calls_means_content_null() -> None:
    result = whole(reader(), tokens(CALL))
    assert result["message"]["content"] is None and len(result["message"]["tool_calls"]) == 1
    assert "reasoning_content" not in result["message"]
    validate("ChatCompletionResponseMessage", result["message"])


def test_text_answers_are_unchanged() -> None:
    text = "Paris is sunny <b>today</b>.\n"
    for spec in (reader(), reader(None)):
        chunks = stream(spec, tokens(text))
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == text
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        result = whole(spec, tokens(text))
        assert result["message"] == {"role": "assistant", "content": text, "refusal": None}


def test_a_cut_off_call_finishes_with_length() -> None:
    pieces = tokens(CALL[:60])
    assert whole(reader(), pieces, "length")["finish_reason"] == "length"
    assert stream(reader(), pieces, "length")[-1]["choices"][0]["finish_reason"] == "length"


def test_thinking_then_a_call() -> None:
    text = "<think>\nWeather, so call it.\n</think>\n\n" + CALL
    chunks = stream(reader(thinks=True), tokens(text, 2))
    thinking = "".join(c["choices"][0]["delta"].get("reasoning_content") or "" for c in chunks)
    assert thinking == "Weather, so call it."
    result = whole(reader(thinks=True), tokens(text, 2))
    assert result["message"]["reasoning_content"] == "Weather, so call it."
    assert result["message"]["content"] is None and result["finish_reason"] == "tool_calls"
    final = reassembled(chunks)
    assert final.message.tool_calls[0].function.name == "get_weather"


def test_thinking_then_text() -> None:
    text = "<think>Short.</think>\n\nThe answer."
    chunks = stream(reader(None, thinks=True), tokens(text, 4))
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "The answer."
    result = whole(reader(None, thinks=True), tokens(text, 4))
    assert result["message"]["reasoning_content"] == "Short." and result["message"]["content"] == "The answer."
