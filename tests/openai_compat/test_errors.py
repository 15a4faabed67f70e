"""Errors in OpenAI's envelope with the right status and the field named in `param`."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from engine import EngineDeadError, EngineOverloadedError, PromptTooLongError
from openai_compat.errors import OpenAIError, from_exception, loc_to_param
from openai_compat.protocol import ChatCompletionRequest


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
        ({"model": None}, "model"),
    ],
)
def test_validation_errors_name_the_field(fields: dict[str, object], param: str) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(body)
    error = from_exception(info.value)
    assert (error.status_code, error.param, error.type) == (400, param, "invalid_request_error")
    assert param in error.message


def test_loc_to_param_drops_union_branches() -> None:
    assert loc_to_param(("messages", 0, "content", "str")) == "messages[0].content"
    assert loc_to_param(("prompt", "list[int]", 3)) == "prompt[3]"
    assert loc_to_param(("stop", "list[str]", 0)) == "stop[0]"
    assert loc_to_param(("model",)) == "model"


def test_engine_errors_map_to_statuses() -> None:
    too_long = from_exception(PromptTooLongError(100, 90, 20))
    assert (too_long.status_code, too_long.code, too_long.param) == (400, "context_length_exceeded", "messages")
    assert too_long.message.startswith(
        "This model's maximum context length is 100 tokens. However, you requested 110 tokens"
    )
    as_prompt = from_exception(PromptTooLongError(100, 90, 20), prompt_param="prompt")
    assert as_prompt.param == "prompt" and "(90 in the prompt, 20 in the completion)" in as_prompt.message
    bad = from_exception(ValueError("top_p must be in (0, 1], got 0.", "top_p"))
    assert (bad.status_code, bad.param) == (400, "top_p")
    busy = from_exception(EngineOverloadedError("full"), retry_after_s=3)
    assert busy.status_code == 429 and busy.headers == {"Retry-After": "3"}
    assert from_exception(EngineDeadError("gone")).status_code == 503
    assert from_exception(RuntimeError("bug")).status_code == 500


def test_envelope() -> None:
    error = OpenAIError("x", param="p")
    assert error.body() == {"error": {"message": "x", "type": "invalid_request_error", "param": "p", "code": None}}
    assert error.sse_data() == '{"error": {"message": "x", "type": "invalid_request_error", "param": "p", "code": null}}'
    response = OpenAIError("slow down", 429, headers={"Retry-After": "1"}).response()
    assert response.status_code == 429 and response.headers["retry-after"] == "1"
