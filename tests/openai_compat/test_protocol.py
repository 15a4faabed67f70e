"""Request schemas: unknown fields ignored, unsupported ones named, responses in OpenAI's shape."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from openai_compat.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatResponseMessage,
    ChatStreamChoice,
    CompletionRequest,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
)

MESSAGES = [{"role": "user", "content": "hi"}]


def chat(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES, **fields})


def test_unknown_fields_are_ignored_and_unsupported_ones_named() -> None:
    assert chat(some_future_field=1).unsupported_field() is None
    assert chat(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="auto").unsupported_field() is None
    assert chat(response_format={"type": "json_object"}).unsupported_field() is None
    assert chat(functions=[{"name": "f"}]).unsupported_field() == "functions"  # the deprecated form
    assert chat(modalities=["text", "audio"]).unsupported_field() == "modalities"
    completion = CompletionRequest.model_validate({"model": "m", "prompt": "x", "suffix": "y"})
    assert completion.unsupported_field() == "suffix"
    assert CompletionRequest.model_validate({"model": "m", "prompt": "x", "best_of": 3}).unsupported_field() == "best_of"


def test_defaults_follow_the_spec() -> None:
    req = chat()
    assert req.max_tokens is None and req.temperature == 1.0 and req.n == 1 and not req.include_usage
    assert chat(stream_options={"include_usage": True}).include_usage
    completion = CompletionRequest.model_validate({"model": "m", "prompt": "x"})
    assert completion.max_tokens == 16  # OpenAI's default for completions
    explicit_null = CompletionRequest.model_validate({"model": "m", "prompt": "x", "max_tokens": None})
    assert explicit_null.max_tokens is None  # up to the context


@pytest.mark.parametrize(
    "prompt", ["text", ["a", "b"], [1, 2, 3], [[1, 2], [3]]], ids=["str", "strs", "ids", "id-lists"]
)
def test_every_prompt_form_parses(prompt: object) -> None:
    assert CompletionRequest.model_validate({"model": "m", "prompt": prompt}).prompt == prompt


def test_content_parts_and_roles() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "u"}}]
    req = chat(messages=[{"role": "user", "content": parts}, {"role": "assistant", "content": None}])
    assert req.messages[0].content[1].type == "image_url"  # type: ignore[index,union-attr]
    with pytest.raises(ValidationError):
        chat(messages=[{"role": "wizard", "content": "x"}])


def test_tool_fields_parse_strictly_and_name_the_field() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    req = chat(tools=[tool], tool_choice={"type": "function", "function": {"name": "f"}}, parallel_tool_calls=False,
               response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}})
    assert req.tools is not None and req.tools[0].function.name == "f" and req.parallel_tool_calls is False
    assert req.response_format is not None and req.response_format.json_schema is not None
    assert req.response_format.json_schema.schema_ == {"type": "object"}
    history = [{"role": "assistant", "content": None,
                "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]
    assert chat(messages=history).messages[0].tool_calls is not None
    for fields, loc in [
        ({"tools": [{"type": "custom", "custom": {}}]}, ("tools", 0, "type")),
        ({"tools": [{"type": "function", "function": {"name": 1}}]}, ("tools", 0, "function", "name")),
        ({"response_format": {"type": "xml"}}, ("response_format", "type")),
    ]:
        with pytest.raises(ValidationError) as e:
            ChatCompletionRequest.model_validate_json(
                json.dumps({"model": "m", "messages": MESSAGES, **fields}), strict=True)
        assert e.value.errors()[0]["loc"] == loc


def test_message_and_delta_serialization_with_calls() -> None:
    call = ToolCall(id="call_1", function=FunctionCall(name="f", arguments='{"a": 1}'))
    message = ChatResponseMessage(content=None, tool_calls=[call]).model_dump()
    assert message == {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]}
    assert ChatResponseMessage(content="x").model_dump() == {"role": "assistant", "content": "x", "refusal": None}
    first = DeltaToolCall(index=0, id="call_1", type="function", function=DeltaFunctionCall(name="f", arguments=""))
    assert DeltaMessage(tool_calls=[first]).model_dump() == {"tool_calls": [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}]}
    piece = DeltaToolCall(index=0, function=DeltaFunctionCall(arguments='{"a'))
    assert DeltaMessage(tool_calls=[piece]).model_dump() == {"tool_calls": [{"index": 0, "function": {"arguments": '{"a'}}]}


def test_chunk_serialization() -> None:
    chunk = ChatCompletionChunk(
        id="chatcmpl-1", created=1, model="m", system_fingerprint="fp",
        choices=[ChatStreamChoice(index=0, delta=DeltaMessage(content="hé"))],
    )
    data = json.loads(chunk.model_dump_json(exclude={"usage"}))
    assert data["choices"][0] == {"index": 0, "delta": {"content": "hé"}, "logprobs": None, "finish_reason": None}
    assert "usage" not in data
    assert json.loads(chunk.model_dump_json())["usage"] is None
    assert DeltaMessage().model_dump() == {}
    assert DeltaMessage(role="assistant", content="").model_dump() == {"role": "assistant", "content": ""}
