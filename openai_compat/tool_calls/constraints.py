"""A chat request's constraint on its answer, as the engine takes it: `structured_output(...)`.

- `tool_choice` `required` or a named function: the answer is calls in the model's own format
  (`ToolFormat.tagged_json`), each naming a function it may call with arguments matching that
  function's `parameters` (one call when named or with `parallel_tool_calls` false).
- Otherwise, the answer's text: `response_format` `json_object` / `json_schema`, or one of the
  extensions vLLM users send (`guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`,
  or the `structured_outputs` object with `json`, `json_object`, `regex`, `choice`, `grammar`).
  At most one of them per request.
- With tools and `tool_choice` `auto`, a text constraint is not applied (it would rule out the
  calls the answer may make); it is still checked.

A reasoning model's constraint starts after its thinking (`start_after`, e.g. `</think>`).

`compile_constraint` has the engine compile it before the request starts: what the grammar
library cannot enforce (a schema feature it lacks, a grammar too large, one that takes too
long to compile) is a 400 naming the request's field that set it. `/v1/completions` takes the
text constraints alone (`text_structured_output`).
"""

from __future__ import annotations

import json
from typing import Any

from engine import AsyncEngine, StructuredOutput, TaggedJSON
from openai_compat.errors import OpenAIError
from openai_compat.protocol import ChatCompletionRequest, SamplingFields
from openai_compat.tool_calls.formats import ToolFormat
from openai_compat.tool_calls.request import ToolPlan, check_json_schema


def structured_output(
    req: ChatCompletionRequest, plan: ToolPlan, tool_format: ToolFormat, start_after: str | None = None
) -> StructuredOutput | None:
    """The request's constraint, or None; OpenAIError (400) naming the field on bad input."""
    text = text_constraint(req)  # checked even where tools take precedence
    if plan.forced:
        return StructuredOutput(tagged_json=calls_shape(plan, tool_format), start_after=start_after)
    if text is None or plan.parses_calls:
        return None
    return _text_output(text, start_after)


def text_structured_output(req: SamplingFields) -> StructuredOutput | None:
    """The constraint on a completion's text, or None; OpenAIError (400) naming the field."""
    text = text_constraint(req)
    return _text_output(text) if text is not None else None


def _text_output(text: tuple[str, dict[str, Any]], start_after: str | None = None) -> StructuredOutput:
    field, kwargs = text
    try:
        return StructuredOutput(**kwargs, start_after=start_after)
    except ValueError as e:
        raise OpenAIError(str(e.args[0]), param=field) from None


async def compile_constraint(
    engine: AsyncEngine, so: StructuredOutput, req: SamplingFields, plan: ToolPlan | None = None
) -> None:
    """The engine compiles `so` (cached for the request that follows); what it cannot enforce
    is a 400 naming the field of `req` that set it: a forced call's tool by its `parameters`
    where one alone fails."""
    try:
        await engine.compile_structured_output(so)
    except ValueError as e:
        raise OpenAIError(str(e.args[0]), param=await _blamed_field(engine, req, plan)) from None


async def _blamed_field(engine: AsyncEngine, req: SamplingFields, plan: ToolPlan | None) -> str:
    if plan is not None and plan.forced:
        for i, tool in enumerate(plan.tools):
            if tool.function.name in plan.callable and tool.function.parameters is not None:
                try:
                    schema = json.dumps(tool.function.parameters, ensure_ascii=False)
                    await engine.compile_structured_output(StructuredOutput(json_schema=schema))
                except ValueError:
                    return f"tools[{i}].function.parameters"
        return "tools"
    text = text_constraint(req)
    field = text[0] if text is not None else "response_format"
    fmt = req.response_format
    if field == "response_format" and fmt is not None and fmt.type == "json_schema":
        return "response_format.json_schema.schema"
    return field


def calls_shape(plan: ToolPlan, tool_format: ToolFormat) -> TaggedJSON:
    """The TaggedJSON of the calls a forced answer makes."""
    key = tool_format.arguments_key
    items = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, key: plan.parameters(name)},
            "required": ["name", key],
            "additionalProperties": False,
        }
        for name in plan.callable
    ]
    item_schema = items[0] if len(items) == 1 else {"anyOf": items}
    return tool_format.tagged_json(item_schema, 1, plan.max_calls)


def text_constraint(req: SamplingFields) -> tuple[str, dict[str, Any]] | None:
    """(the field that set it, StructuredOutput's arguments) for the answer's text, or None."""
    found: list[tuple[str, dict[str, Any]]] = []
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append(("response_format", {"json_object": True}))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise OpenAIError("A response_format of type 'json_schema' needs its 'json_schema'.",
                              param="response_format.json_schema")
        if fmt.json_schema.schema_ is None:
            raise OpenAIError("response_format.json_schema needs its 'schema'.", param="response_format.json_schema.schema")
        found.append(("response_format", _schema(fmt.json_schema.schema_, "response_format.json_schema.schema")))
    found += _extensions(req)
    if len(found) > 1:
        raise OpenAIError(
            f"Only one constraint on the answer may be given; this request has {found[0][0]} and {found[1][0]}.",
            param=found[1][0],
        )
    return found[0] if found else None


def _extensions(req: SamplingFields) -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = []
    so = req.structured_outputs
    fields: list[tuple[str, str, Any]] = [
        ("guided_json", "json_schema", req.guided_json),
        ("guided_regex", "regex", req.guided_regex),
        ("guided_choice", "choice", req.guided_choice),
        ("guided_grammar", "grammar", req.guided_grammar),
    ]
    if so is not None:
        fields += [
            ("structured_outputs.json", "json_schema", so.json_),
            ("structured_outputs.json_object", "json_object", so.json_object or None),
            ("structured_outputs.regex", "regex", so.regex),
            ("structured_outputs.choice", "choice", so.choice),
            ("structured_outputs.grammar", "grammar", so.grammar),
        ]
    for field, kind, value in fields:
        if value is None:
            continue
        if kind == "json_schema":
            found.append((field, _schema(value, field)))
        elif kind == "choice":
            if not value:
                raise OpenAIError(f"'{field}' must hold at least one string.", param=field)
            found.append((field, {"choice": tuple(value)}))
        elif not value:
            raise OpenAIError(f"'{field}' must not be empty.", param=field)
        else:
            found.append((field, {kind: value}))
    return found


def _schema(value: Any, field: str) -> dict[str, Any]:
    if isinstance(value, str):  # a schema sent as its JSON text
        try:
            value = json.loads(value)
        except ValueError:
            raise OpenAIError(f"'{field}' is not valid JSON.", param=field) from None
    check_json_schema(value, field)
    return {"json_schema": json.dumps(value, ensure_ascii=False)}
