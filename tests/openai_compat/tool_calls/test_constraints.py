"""A request's constraint for the engine (`StructuredOutput`), and the 400s naming the field."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from engine import StructuredOutput, TaggedJSON
from openai_compat.errors import OpenAIError
from openai_compat.protocol import ChatCompletionRequest
from openai_compat.tool_calls.constraints import structured_output
from openai_compat.tool_calls.formats import HERMES, LLAMA3_JSON, MISTRAL, ToolFormat
from openai_compat.tool_calls.request import plan_tools

CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": CITY}},
    {"type": "function", "function": {"name": "get_time"}},  # no parameters
]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def constraint(fmt: ToolFormat = HERMES, start_after: str | None = None, **body: Any) -> StructuredOutput | None:
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}], **body})
    plan = plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls)
    return structured_output(req, plan, fmt, start_after)


def refused(**body: Any) -> str | None:
    with pytest.raises(OpenAIError) as e:
        constraint(**body)
    assert e.value.status_code == 400
    return e.value.param


def item_validator(shape: TaggedJSON) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads(shape.schema))


def test_required_constrains_to_calls_of_any_tool() -> None:
    out = constraint(tools=TOOLS, tool_choice="required")
    assert out is not None and out.kind == "tagged_json" and out.tagged_json is not None
    shape = out.tagged_json
    assert (shape.begin, shape.end, shape.min_items, shape.max_items) == ("<tool_call>\n", "\n</tool_call>", 1, None)
    check = item_validator(shape)
    assert check.is_valid({"name": "get_weather", "arguments": {"city": "Paris"}})
    assert check.is_valid({"name": "get_time", "arguments": {}})  # no parameters: an empty object
    assert not check.is_valid({"name": "get_time", "arguments": {"when": "now"}})  # and nothing in it
    assert not check.is_valid({"name": "get_weather", "arguments": {}})  # its schema requires city
    assert not check.is_valid({"name": "rm_rf", "arguments": {}})
    assert not check.is_valid({"name": "get_time", "arguments": {}, "extra": 1})


def test_named_and_parallel_off_allow_one_call() -> None:
    shape = constraint(tools=TOOLS, tool_choice=NAMED).tagged_json  # type: ignore[union-attr]
    assert shape is not None and shape.max_items == 1
    assert not item_validator(shape).is_valid({"name": "get_time", "arguments": {}})
    shape = constraint(tools=TOOLS, tool_choice="required", parallel_tool_calls=False).tagged_json  # type: ignore[union-attr]
    assert shape is not None and shape.max_items == 1


def test_each_format_shapes_its_calls() -> None:
    llama = constraint(LLAMA3_JSON, tools=TOOLS, tool_choice=NAMED).tagged_json  # type: ignore[union-attr]
    assert llama is not None and item_validator(llama).is_valid({"name": "get_weather", "parameters": {"city": "x"}})
    mistral = constraint(MISTRAL, tools=TOOLS, tool_choice="required").tagged_json  # type: ignore[union-attr]
    assert mistral is not None and mistral.begin == "[TOOL_CALLS] " and mistral.max_items == 1
    assert item_validator(mistral).is_valid([{"name": "get_time", "arguments": {}}])
    assert not item_validator(mistral).is_valid([])


def test_allowed_tools_narrow_the_calls() -> None:
    choice = {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
        {"type": "function", "function": {"name": "get_time"}}]}}
    shape = constraint(tools=TOOLS, tool_choice=choice).tagged_json  # type: ignore[union-attr]
    assert shape is not None and not item_validator(shape).is_valid({"name": "get_weather", "arguments": {"city": "x"}})


def test_reasoning_models_are_constrained_after_thinking() -> None:
    out = constraint(start_after="</think>", tools=TOOLS, tool_choice="required")
    assert out is not None and out.start_after == "</think>"


@pytest.mark.parametrize(("body", "kind", "value"), [
    ({"response_format": {"type": "json_object"}}, "json_object", True),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": CITY, "strict": True}}},
     "json_schema", CITY),
    ({"guided_json": CITY}, "json_schema", CITY),
    ({"guided_json": json.dumps(CITY)}, "json_schema", CITY),
    ({"guided_regex": "[a-z]+"}, "regex", "[a-z]+"),
    ({"guided_choice": ["yes", "no"]}, "choice", ("yes", "no")),
    ({"guided_grammar": 'root ::= "a"'}, "grammar", 'root ::= "a"'),
    ({"structured_outputs": {"json": CITY}}, "json_schema", CITY),
    ({"structured_outputs": {"choice": ["a"]}}, "choice", ("a",)),
    ({"structured_outputs": {"json_object": True}}, "json_object", True),
])
def test_text_constraints(body: dict[str, Any], kind: str, value: Any) -> None:
    out = constraint(**body)
    assert out is not None and out.kind == kind
    got = getattr(out, kind)
    assert (json.loads(got) if kind == "json_schema" else got) == value


def test_no_constraint() -> None:
    assert constraint() is None
    assert constraint(response_format={"type": "text"}) is None
    assert constraint(tools=TOOLS) is None and constraint(tools=TOOLS, tool_choice="none") is None
    # With calls possible (auto), the text constraint would rule them out: not applied.
    assert constraint(tools=TOOLS, response_format={"type": "json_object"}) is None
    # A forced call wins over the text's format.
    forced = constraint(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"})
    assert forced is not None and forced.kind == "tagged_json"


@pytest.mark.parametrize(("body", "param"), [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"properties": {"a": {"minLength": -1}}}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [*TOOLS, TOOLS[0]]}, "tools[2].function.name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [
        {"type": "function", "function": {"name": "nope"}}]}}}, "tool_choice.allowed_tools.tools[0]"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 1}}}},
     "response_format.json_schema.schema"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": ""}, "guided_regex"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
    ({"guided_json": CITY, "structured_outputs": {"regex": "a"}}, "structured_outputs.regex"),
])
def test_bad_input_is_a_400_naming_the_field(body: dict[str, Any], param: str) -> None:
    assert refused(**body) == param
