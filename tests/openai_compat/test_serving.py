"""Translation helpers: request → SamplingParams, messages → template input, prompt forms."""

from __future__ import annotations

import pytest

from engine import RequestOutputKind
from openai_compat.errors import OpenAIError
from openai_compat.protocol import ChatCompletionRequest
from openai_compat.request_parsing import build_sampling_params
from openai_compat.serving_chat import template_messages
from openai_compat.serving_completions import split_prompts


def chat(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields})


def test_sampling_params_from_request() -> None:
    req = chat(temperature=None, n=None, stop="END", logit_bias={"5": -100}, seed=7, top_k=3, min_tokens=2)
    params = build_sampling_params(req, max_tokens=None, logprobs=2)
    assert params.temperature == 1.0 and params.n == 1 and params.stop == ["END"]
    assert params.logit_bias == {5: -100.0} and params.seed == 7 and params.top_k == 3 and params.min_tokens == 2
    assert params.max_tokens is None and params.logprobs == 2
    assert params.output_kind is RequestOutputKind.DELTA


@pytest.mark.parametrize(("fields", "param"), [({"logit_bias": {"a": 1}}, "logit_bias"), ({"top_p": 0}, "top_p")])
def test_bad_sampling_values_name_the_field(fields: dict[str, object], param: str) -> None:
    with pytest.raises(ValueError) as info:
        build_sampling_params(chat(**fields), max_tokens=None, logprobs=None)
    assert info.value.args[1] == param


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
