"""Request schemas: unknown fields ignored, unsupported ones named, responses in OpenAI's shape."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from openai_compat.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatStreamChoice,
    CompletionRequest,
    DeltaMessage,
)

MESSAGES = [{"role": "user", "content": "hi"}]


def chat(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES, **fields})


def test_unknown_fields_are_ignored_and_unsupported_ones_named() -> None:
    assert chat(some_future_field=1).unsupported_field() is None
    assert chat(tools=[{"type": "function"}]).unsupported_field() == "tools"
    assert chat(tools=[], tool_choice="none").unsupported_field() is None
    assert chat(tool_choice="auto").unsupported_field() == "tool_choice"
    assert chat(response_format={"type": "json_object"}).unsupported_field() == "response_format"
    assert chat(response_format={"type": "text"}).unsupported_field() is None
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
