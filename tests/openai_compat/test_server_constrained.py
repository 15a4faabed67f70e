"""Constrained answers of the served default model (SmolLM2-135M-Instruct), through the real
clients: the openai SDK's `parse()` with a pydantic model, `json_schema` strict with a nested
schema (streamed too), forced tool calls whose arguments match the tool's parameters, and
LangChain's `with_structured_output` by each of its methods.

A 135M model left to itself rarely writes JSON that a schema accepts, and never reliably: what
these tests check holds only because the grammar constrains every token. The schemas bound
their strings and arrays (`maxLength`, `maxItems`), as careful clients do, so that an answer
always ends within its max_tokens.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.openai_compat.openai_schema import validate
from tests.openai_compat.servers import ProcessServer, post, stream_chunks

MODEL = "SmolLM2-135M-Instruct"
Short = Annotated[str, Field(max_length=24)]


class Address(BaseModel):
    city: Short
    country: Short


class Person(BaseModel):
    name: Short
    age: int = Field(ge=0, le=120)
    address: Address
    hobbies: list[Short] = Field(max_length=3)


PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 24}, "country": {"type": "string", "maxLength": 24}},
            "required": ["city", "country"], "additionalProperties": False,
        },
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 3},
    },
    "required": ["name", "age", "address", "hobbies"],
    "additionalProperties": False,
}
ALICE = [{"role": "user", "content": "Alice is 31 and lives in Paris, France. She likes chess and jazz. Describe her."}]

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather now in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 24},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    }, "required": ["city", "unit"], "additionalProperties": False},
}}
FLIGHT = {"type": "function", "function": {
    "name": "book_flight", "description": "Book a flight",
    "parameters": {"type": "object", "properties": {
        "route": {"type": "object", "properties": {
            "from": {"type": "string", "maxLength": 16}, "to": {"type": "string", "maxLength": 16},
        }, "required": ["from", "to"], "additionalProperties": False},
        "passengers": {"type": "integer", "minimum": 1, "maximum": 9},
    }, "required": ["route", "passengers"], "additionalProperties": False},
}}
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, FLIGHT)}


@pytest.fixture(scope="module")
def client(default_server: ProcessServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{default_server.url}/v1", api_key="x", max_retries=0, timeout=300)


def test_parse_returns_the_pydantic_model(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(
        model=MODEL, messages=ALICE, response_format=Person, temperature=0, max_tokens=120,  # type: ignore[arg-type]
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Person)
    assert choice.message.parsed == Person.model_validate_json(choice.message.content or "")


def test_json_schema_strict_nested_sampled_and_streamed(client: openai.OpenAI, default_server: ProcessServer) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": PERSON_SCHEMA}}
    # Sampled at temperature 1: three choices of one request, each its own grammar state.
    sampled = client.chat.completions.create(
        model=MODEL, messages=ALICE, response_format=fmt, temperature=1.0, seed=7, n=3, max_tokens=120,  # type: ignore[arg-type]
    )
    assert len(sampled.choices) == 3
    for choice in sampled.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content or ""), PERSON_SCHEMA)
    # Streamed (greedy): every chunk in the spec's shape, the text the whole response's.
    body = {"model": MODEL, "messages": ALICE, "response_format": fmt, "temperature": 0, "max_tokens": 120}
    whole = post(default_server.url, "/v1/chat/completions", body).json()
    validate("CreateChatCompletionResponse", whole)
    chunks = stream_chunks(post(default_server.url, "/v1/chat/completions", {**body, "stream": True}))
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    jsonschema.validate(json.loads(text), PERSON_SCHEMA)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "book_flight"}}],
                         ids=["required", "named"])
def test_forced_tool_calls_match_the_parameters(client: openai.OpenAI, tool_choice: Any) -> None:
    messages = [{"role": "user", "content": "Book a flight from Paris to Rome for two people."}]
    # One call (a named tool_choice allows one anyway): left to call again, a small model
    # repeats its call until max_tokens.
    kwargs: dict[str, Any] = dict(model=MODEL, messages=messages, tools=[WEATHER, FLIGHT], tool_choice=tool_choice,
                                  parallel_tool_calls=False, temperature=0, max_tokens=120)
    response = client.chat.completions.create(**kwargs)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.id.startswith("call_") and call.function.name in PARAMETERS
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])
    assert [c.function.name for c in choice.message.tool_calls] == ["book_flight"]
    # Streamed: the SDK puts the deltas back together into the same calls.
    with client.chat.completions.stream(**kwargs) as events:
        final = events.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in final.message.tool_calls or ()] == [
        (c.function.name, c.function.arguments) for c in choice.message.tool_calls
    ]


class City(BaseModel):
    """A city and its country."""

    name: Short
    country: Short


@pytest.mark.parametrize("method", ["function_calling", "json_mode", "json_schema"])
def test_langchain_with_structured_output_parses(default_server: ProcessServer, method: str) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{default_server.url}/v1", api_key="x", model=MODEL, max_tokens=60, temperature=0)  # type: ignore[arg-type]
    structured = llm.with_structured_output(City, method=method)  # type: ignore[arg-type]
    question = 'Which city is the capital of France? Answer in JSON with the keys "name" and "country".'
    assert isinstance(structured.invoke(question), City)
