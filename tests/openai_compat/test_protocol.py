"""Request parsing, error mapping, sampling params, logprob shapes and settings: no server."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from engine import EngineDeadError, EngineOverloadedError, Logprob, PromptTooLongError, RequestOutputKind
from openai_compat.config import Settings, load_settings
from openai_compat.errors import OpenAIError, from_exception, loc_to_param
from openai_compat.logprobs import CompletionLogprobsBuilder, chat_logprobs, token_bytes
from openai_compat.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatStreamChoice,
    CompletionRequest,
    DeltaMessage,
)
from openai_compat.serving_base import build_sampling_params
from openai_compat.serving_chat import template_messages
from openai_compat.serving_completions import split_prompts
from openai_compat.sse import DONE, format_event

MESSAGES = [{"role": "user", "content": "hi"}]


def chat(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES, **fields})


def test_unknown_fields_are_ignored_and_unsupported_ones_named() -> None:
    assert chat(some_future_field=1).unsupported_field() is None
    assert chat(tools=[{"type": "function"}]).unsupported_field() == "tools"
    assert chat(tools=[], tool_choice="none").unsupported_field() is None
    assert chat(response_format={"type": "json_object"}).unsupported_field() == "response_format"
    assert chat(response_format={"type": "text"}).unsupported_field() is None
    completion = CompletionRequest.model_validate({"model": "m", "prompt": "x", "suffix": "y"})
    assert completion.unsupported_field() == "suffix"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"n": 0}, "n"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"top_logprobs": 21}, "top_logprobs"),
    ],
)
def test_validation_errors_name_the_field(fields: dict[str, object], param: str) -> None:
    with pytest.raises(ValidationError) as info:
        chat(**fields)
    error = from_exception(info.value)
    assert error.status_code == 400
    assert error.param == param


def test_loc_to_param_drops_union_branches() -> None:
    assert loc_to_param(("messages", 0, "content", "str")) == "messages[0].content"
    assert loc_to_param(("prompt", "list[int]", 3)) == "prompt[3]"
    assert loc_to_param(("stop", "list[str]", 0)) == "stop[0]"


def test_engine_errors_map_to_statuses() -> None:
    too_long = from_exception(PromptTooLongError(100, 90, 20))
    assert (too_long.status_code, too_long.code) == (400, "context_length_exceeded")
    assert too_long.message.startswith("This model's maximum context length is 100 tokens. However, you requested 110 tokens")
    bad = from_exception(ValueError("top_p must be in (0, 1], got 0.", "top_p"))
    assert (bad.status_code, bad.param) == (400, "top_p")
    busy = from_exception(EngineOverloadedError("full"), retry_after_s=3)
    assert busy.status_code == 429 and busy.headers == {"Retry-After": "3"}
    assert from_exception(EngineDeadError("gone")).status_code == 503
    assert from_exception(RuntimeError("bug")).status_code == 500
    body = OpenAIError("x", param="p").body()
    assert body == {"error": {"message": "x", "type": "invalid_request_error", "param": "p", "code": None}}


def test_sampling_params_from_request() -> None:
    req = chat(temperature=None, n=None, stop="END", logit_bias={"5": -100}, seed=7, top_k=3)
    params = build_sampling_params(req, max_tokens=None, logprobs=2)
    assert params.temperature == 1.0 and params.n == 1 and params.stop == ["END"]
    assert params.logit_bias == {5: -100.0} and params.seed == 7 and params.top_k == 3
    assert params.max_tokens is None and params.logprobs == 2
    assert params.output_kind is RequestOutputKind.DELTA
    with pytest.raises(ValueError) as info:
        build_sampling_params(chat(logit_bias={"a": 1}), max_tokens=None, logprobs=None)
    assert info.value.args[1] == "logit_bias"
    with pytest.raises(ValueError) as info:
        build_sampling_params(chat(top_p=0), max_tokens=None, logprobs=None)
    assert info.value.args[1] == "top_p"


def test_template_messages() -> None:
    req = chat(messages=[
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None},
        {"role": "tool", "content": "42", "tool_call_id": "t1"},
    ])
    out = template_messages(req.messages)
    assert out[0] == {"role": "system", "content": "be brief"}
    assert out[1] == {"role": "user", "content": "a\nb"}
    assert out[2] == {"role": "assistant", "content": ""}
    assert out[3] == {"role": "tool", "content": "42", "tool_call_id": "t1"}
    image = chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(OpenAIError) as info:
        template_messages(image.messages)
    assert info.value.param == "messages[0].content[0].type"


def test_split_prompts() -> None:
    assert split_prompts("a") == ["a"]
    assert split_prompts(["a", "b"]) == ["a", "b"]
    assert split_prompts([1, 2]) == [[1, 2]]
    assert split_prompts([[1], [2, 3]]) == [[1], [2, 3]]
    with pytest.raises(OpenAIError):
        split_prompts([])


def test_sse_framing_and_delta_serialization() -> None:
    chunk = ChatCompletionChunk(
        id="chatcmpl-1", created=1, model="m", system_fingerprint="fp",
        choices=[ChatStreamChoice(index=0, delta=DeltaMessage(content="hé"))],
    )
    event = format_event(chunk.model_dump_json(exclude={"usage"}))
    assert event.startswith(b"data: {") and event.endswith(b"}\n\n") and event.count(b"\n") == 2
    data = json.loads(event[6:])
    assert data["choices"][0] == {"index": 0, "delta": {"content": "hé"}, "logprobs": None, "finish_reason": None}
    assert "usage" not in data
    assert DeltaMessage().model_dump() == {}
    assert DONE == b"data: [DONE]\n\n"


def test_logprob_shapes() -> None:
    position = {7: Logprob(-0.5, 2, "b"), 3: Logprob(-0.1, 1, "a"), 9: Logprob(float("-inf"), 3, "c")}
    (entry,) = chat_logprobs(None, [7], [position], top_k=2)
    assert entry.token == "b" and entry.logprob == -0.5 and entry.bytes == [98]
    assert [t.token for t in entry.top_logprobs] == ["a", "b"]
    (entry,) = chat_logprobs(None, [9], [position], top_k=0)
    assert entry.logprob == -9999.0 and entry.top_logprobs == []
    assert token_bytes("bytes:\\xe4\\xb8") == [0xE4, 0xB8]
    builder = CompletionLogprobsBuilder(None, top_k=1)
    out = builder.add([3, 7], [None, position])
    assert out.tokens == ["token_id:3", "b"] and out.token_logprobs == [None, -0.5]
    assert out.text_offset == [0, len("token_id:3")]
    assert out.top_logprobs == [None, {"a": -0.1, "b": -0.5}]


def test_settings_env_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIGHTGATE_PORT", "9001")
    monkeypatch.setenv("LIGHTGATE_API_KEYS", "a, b")
    monkeypatch.setenv("LIGHTGATE_MAX_NUM_SEQS", "8")
    import argparse

    from openai_compat.config import add_cli_flags

    parser = argparse.ArgumentParser()
    add_cli_flags(parser)
    settings = load_settings(parser.parse_args(["--port", "9002", "--no-enable-prefix-caching", "--model-aliases", "x,y"]))
    assert settings.port == 9002 and settings.api_keys == ["a", "b"] and settings.model_aliases == ["x", "y"]
    assert settings.enable_prefix_caching is False
    config = settings.engine_config()
    assert config.max_num_seqs == 8 and config.enable_prefix_caching is False
    assert Settings(_env_file=None).host == "127.0.0.1"  # type: ignore[call-arg]
