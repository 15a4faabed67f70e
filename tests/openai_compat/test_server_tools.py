"""Tools, response formats and constraints through the shared tiny server, driven by the openai
SDK, LangChain and raw HTTP.

The tiny model has random weights and the default model's template, which has no place for
tools: the definitions reach it in the system message. What it generates is noise, so these
tests check what a client relies on whatever the text: every choice is accepted, every
response and chunk has the spec's shape, a stream reassembles into the same message as the
whole response, the prompt carries the tools and the history, a forced call is a valid call
(its grammar writes it, noise or not), and bad input is a 400. What a real model answers under
constraints, LangChain's `with_structured_output` included: test_server_constrained.py.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from openai_compat.tool_calls.request import NO_PARAMETERS
from tests.openai_compat.openai_schema import validate
from tests.openai_compat.servers import TINY, ProcessServer, post, stream_chunks

MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather", "description": "The weather now in a city",
        # (bounded: a forced call of the random-weight model ends within a few tokens)
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6}}, "required": ["city"],
                       "additionalProperties": False},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time now"}}
UNIQUE_TAGS = {"type": "function", "function": {"name": "tag", "parameters": {
    "type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}}}
CHOICES: list[Any] = ["none", "auto", "required", {"type": "function", "function": {"name": "get_weather"}}]
SAMPLING: dict[str, Any] = {"temperature": 0.0, "max_tokens": 24}


@pytest.fixture(scope="module")
def client(tiny_server: ProcessServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="x", max_retries=0)


def check_message(choice: dict[str, Any], tools: bool) -> None:
    message = choice["message"]
    assert choice["finish_reason"] in ("stop", "length", "tool_calls")
    calls = message.get("tool_calls")
    if not tools:
        assert calls is None and isinstance(message["content"], str)
        return
    assert (choice["finish_reason"] == "tool_calls") == bool(calls and choice["finish_reason"] != "length")
    for call in calls or ():
        assert call["id"].startswith("call_") and call["type"] == "function"
        assert call["function"]["name"] in ("get_weather", "get_time")
        assert isinstance(call["function"]["arguments"], str)
    assert (message["content"] is None) == bool(calls and not message["content"])


@pytest.mark.parametrize("tool_choice", CHOICES, ids=["none", "auto", "required", "named"])
def test_every_tool_choice_is_answered_in_the_specs_shape(
    client: openai.OpenAI, tiny_server: ProcessServer, tiny_tokenizer: Any, tool_choice: Any
) -> None:
    # Ends with eos after 12 tokens, or once a forced call is complete (its grammar allows eos
    # only then): the SDK's stream helper refuses an answer cut off by length.
    ending = {"logit_bias": {str(tiny_tokenizer.eos_token_id): 100}, "extra_body": {"min_tokens": 12}}
    body = {"model": TINY, "messages": MESSAGES, "tools": [WEATHER, TIME], "tool_choice": tool_choice,
            **SAMPLING, "max_tokens": 64, **ending}
    raw = client.chat.completions.with_raw_response.create(**body)
    data = raw.http_response.json()
    validate("CreateChatCompletionResponse", data)
    check_message(data["choices"][0], tool_choice != "none")
    if tool_choice not in ("none", "auto"):  # forced: a valid call, whatever the random weights favour
        assert data["choices"][0]["finish_reason"] == "tool_calls"
        for call in data["choices"][0]["message"]["tool_calls"]:
            name, arguments = call["function"]["name"], json.loads(call["function"]["arguments"])
            assert name == "get_weather" or (tool_choice == "required" and name == "get_time")
            jsonschema.validate(arguments, WEATHER["function"]["parameters"] if name == "get_weather" else NO_PARAMETERS)
    parsed = raw.parse()
    assert parsed.choices[0].message.content == data["choices"][0]["message"]["content"]
    # Streamed: every chunk in the spec's shape, and the SDK puts them back together into
    # the same message (greedy: the same text).
    http_body = {**{k: v for k, v in body.items() if k != "extra_body"}, **ending["extra_body"], "stream": True}
    for chunk in stream_chunks(post(tiny_server.url, "/v1/chat/completions", http_body)):
        validate("CreateChatCompletionStreamResponse", chunk)
    with client.chat.completions.stream(**body) as events:
        final = events.get_final_completion().choices[0]
    expected = data["choices"][0]
    assert final.finish_reason == expected["finish_reason"]
    assert (final.message.content or None) == expected["message"]["content"]
    got_calls = [{"name": c.function.name, "arguments": c.function.arguments} for c in final.message.tool_calls or ()]
    assert got_calls == [c["function"] for c in expected["message"].get("tool_calls") or ()]


def test_a_follow_up_turn_with_tool_results(client: openai.OpenAI, tiny_server: ProcessServer) -> None:
    call_id = "call_abc123"
    history: list[Any] = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": call_id, "content": '{"celsius": 21}'},
    ]
    response = client.chat.completions.create(model=TINY, messages=history, tools=[WEATHER], **SAMPLING)
    assert response.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # What the model saw: the tools in the system message, its call and the result in the history.
    ids = post(tiny_server.url, "/tokenize", {"messages": history, "tools": [WEATHER]}).json()["tokens"]
    prompt = post(tiny_server.url, "/detokenize", {"tokens": ids}).json()["prompt"]
    assert prompt.startswith("<|im_start|>system\n# Tools\n") and '"name": "get_weather"' in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert '<|im_start|>user\n<tool_response>\n{"celsius": 21}\n</tool_response><|im_end|>' in prompt
    count = response.usage.prompt_tokens if response.usage else None
    assert count == len(ids)
    assert tiny_server.log().count("no place for tools") == 1  # warned once, however many requests


@pytest.mark.parametrize("body", [
    {"response_format": {"type": "json_object"}},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "city", "strict": True, "schema": {
        "type": "object", "properties": {"city": {"type": "string"}, "tags": {"type": "array", "items": {
            "type": "object", "properties": {"k": {"type": "string"}}, "required": ["k"]}}},
        "required": ["city", "tags"], "additionalProperties": False}}}},
    {"guided_choice": ["yes", "no"]},
    {"guided_regex": "[a-z]{3}"},
    {"structured_outputs": {"json": {"type": "object"}}},
    {"tools": [WEATHER], "response_format": {"type": "json_object"}, "parallel_tool_calls": False},
], ids=["json_object", "json_schema", "guided_choice", "guided_regex", "structured_outputs", "tools-and-format"])
def test_constrained_requests_are_accepted(tiny_server: ProcessServer, body: dict[str, Any]) -> None:
    full = {"model": TINY, "messages": MESSAGES, **SAMPLING, **body}
    response = post(tiny_server.url, "/v1/chat/completions", full)
    assert response.status_code == 200, response.text
    validate("CreateChatCompletionResponse", response.json())
    for chunk in stream_chunks(post(tiny_server.url, "/v1/chat/completions", {**full, "stream": True})):
        validate("CreateChatCompletionStreamResponse", chunk)


BAD: list[tuple[str, dict[str, Any], str]] = [
    ("tool without function", {"tools": [{"type": "function"}]}, "tools[0].function"),
    ("custom tool", {"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0].type"),
    ("parameters not a schema", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "objekt"}}}]}, "tools[0].function.parameters"),
    ("named choice not in tools", {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {
        "name": "get_time"}}}, "tool_choice"),
    ("required without tools", {"tool_choice": "required"}, "tool_choice"),
    ("unknown tool_choice", {"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ("json_schema without schema", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema"),
    ("unknown response_format", {"response_format": {"type": "yaml"}}, "response_format.type"),
    ("two constraints", {"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ("tool message without id", {"messages": [*MESSAGES, {"role": "tool", "content": "x"}]},
     "messages[1].tool_call_id"),
    ("malformed tool call in history", {"messages": [*MESSAGES, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f"}}]}]}, "messages[1].tool_calls[0].function.arguments"),
    # what the grammar library cannot enforce, found when the engine compiles the constraint
    ("schema feature not enforced", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}}}},
     "response_format.json_schema.schema"),
    ("tool parameters not enforced", {"tools": [WEATHER, UNIQUE_TAGS], "tool_choice": "required"},
     "tools[1].function.parameters"),
    ("regex that does not compile", {"guided_regex": "("}, "guided_regex"),
    ("grammar that does not compile", {"guided_grammar": "start: foo"}, "guided_grammar"),
]


@pytest.mark.parametrize(("name", "body", "param"), BAD, ids=[b[0] for b in BAD])
def test_bad_tool_input_is_a_400_naming_the_field(
    tiny_server: ProcessServer, name: str, body: dict[str, Any], param: str
) -> None:
    response = post(tiny_server.url, "/v1/chat/completions", {"model": TINY, "messages": MESSAGES, **body})
    assert response.status_code == 400, response.text
    validate("ErrorResponse", response.json())
    assert response.json()["error"]["param"] == param


def test_n2_each_choice_read_on_its_own(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=TINY, messages=MESSAGES, tools=[WEATHER], n=2, seed=3, max_tokens=16,  # type: ignore[arg-type]
    )
    assert [c.index for c in response.choices] == [0, 1]
    for choice in response.choices:
        check_message(choice.model_dump(), True)


def langchain_model(server: ProcessServer, tokenizer: Any) -> Any:
    """LangChain's OpenAI chat model on the server, ending on eos after 8 tokens (the SDK's
    parsing, which LangChain uses for response formats, refuses an answer cut off by length)."""
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        base_url=f"{server.url}/v1", api_key="x", model=TINY, max_tokens=16, temperature=0,  # type: ignore[arg-type]
        logit_bias={tokenizer.eos_token_id: 100}, extra_body={"min_tokens": 8},
    )


def test_langchain_bind_tools(tiny_server: ProcessServer, tiny_tokenizer: Any) -> None:
    from langchain_core.messages import AIMessage
    from pydantic import BaseModel

    class GetWeather(BaseModel):
        """The weather now in a city."""

        city: str

    llm = langchain_model(tiny_server, tiny_tokenizer)
    for tool_choice in (None, "auto", "any", "GetWeather"):
        bound = llm.bind_tools([GetWeather], tool_choice=tool_choice)
        answer = bound.invoke("Weather in Paris?")
        assert isinstance(answer, AIMessage) and isinstance(answer.tool_calls, list)
        streamed = None
        for chunk in bound.stream("Weather in Paris?"):
            streamed = chunk if streamed is None else streamed + chunk
        assert streamed is not None and streamed.content == answer.content
        assert [c["name"] for c in streamed.tool_calls] == [c["name"] for c in answer.tool_calls]


def test_completions_take_text_constraints(tiny_server: ProcessServer) -> None:
    """/v1/completions constrains its text as chat does; what cannot be enforced is a 400."""
    body = {"model": TINY, "prompt": "Yes or no?", "max_tokens": 16, "temperature": 1.0, "seed": 4, "n": 3}
    response = post(tiny_server.url, "/v1/completions", {**body, "guided_choice": ["yes", "no"]})
    assert response.status_code == 200, response.text
    assert [(c["text"], c["finish_reason"]) in (("yes", "stop"), ("no", "stop")) for c in response.json()["choices"]] == [True] * 3
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "integer", "minimum": 0, "maximum": 99}}}
    response = post(tiny_server.url, "/v1/completions", {**body, "response_format": fmt})
    assert all(0 <= json.loads(c["text"]) <= 99 for c in response.json()["choices"])
    response = post(tiny_server.url, "/v1/completions", {**body, "guided_regex": "("})
    assert response.status_code == 400 and response.json()["error"]["param"] == "guided_regex"


def test_a_cut_short_body_with_tools_is_no_server_error(tiny_server: ProcessServer) -> None:
    body = json.dumps({"model": TINY, "messages": MESSAGES, "tools": [WEATHER]})[:-20]
    response = httpx.post(f"{tiny_server.url}/v1/chat/completions", content=body,
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 400
