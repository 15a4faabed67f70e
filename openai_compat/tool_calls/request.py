"""What a chat request asks of tools, checked: `plan_tools(req) -> ToolPlan`.

Everything a client can get wrong is a 400 naming the field: a tool name OpenAI would refuse,
two tools of one name, `parameters` that are not a JSON schema (checked against the schema's
own meta-schema), a `tool_choice` naming a function absent from `tools`, or forcing a call
without any tools.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from openai_compat.errors import OpenAIError
from openai_compat.protocol import AllowedToolsChoice, ChatTool, NamedToolChoice, ToolChoice

_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}  # called with {}


@dataclass(frozen=True)
class ToolPlan:
    """The request's tools as the prompt shows them, and which calls its answer may make."""

    tools: tuple[ChatTool, ...] = ()  # every tool of the request, in the prompt
    mode: Literal["none", "auto", "required"] = "none"
    callable: tuple[str, ...] = ()  # the functions a call may name (allowed_tools narrows them)
    max_calls: int | None = None  # 1 for a named function or parallel_tool_calls false
    named: str | None = None  # tool_choice named this function

    @property
    def parses_calls(self) -> bool:
        """Whether the answer is read for calls."""
        return bool(self.tools) and self.mode != "none"

    @property
    def forced(self) -> bool:
        """Whether the answer must be calls (tool_choice required or named)."""
        return self.parses_calls and self.mode == "required"

    def parameters(self, name: str) -> dict[str, Any]:
        tool = next(t for t in self.tools if t.function.name == name)
        return tool.function.parameters if tool.function.parameters is not None else NO_PARAMETERS


def check_json_schema(schema: Any, param: str) -> None:
    """400 unless `schema` is a JSON schema by the meta-schema it names (2020-12 when none)."""
    if not isinstance(schema, dict):
        raise OpenAIError(f"'{param}' must be a JSON schema (an object).", param=param)
    from jsonschema import SchemaError, validators  # type: ignore[import-untyped]

    checker = validators.validator_for(schema, default=validators.Draft202012Validator)
    try:
        checker.check_schema(schema)
    except SchemaError as e:
        raise OpenAIError(f"'{param}' is not a valid JSON schema: {e.message} (at {e.json_path}).", param=param) from None
    except RecursionError:
        raise OpenAIError(f"'{param}' is nested too deeply.", param=param) from None


def _check_tools(tools: list[ChatTool]) -> None:
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        name = tool.function.name
        if not _FUNCTION_NAME.fullmatch(name):
            raise OpenAIError(
                f"Invalid function name {name!r}: use 1 to 64 letters, digits, underscores or dashes.",
                param=f"tools[{i}].function.name",
            )
        if name in seen:
            raise OpenAIError(f"Two tools are named {name!r}.", param=f"tools[{i}].function.name")
        seen.add(name)
        if tool.function.parameters is not None:
            check_json_schema(tool.function.parameters, f"tools[{i}].function.parameters")


def plan_tools(
    tools_field: list[ChatTool] | None, choice: ToolChoice | None = None, parallel_tool_calls: bool | None = True
) -> ToolPlan:
    """A request's tool plan from its `tools`, `tool_choice` and `parallel_tool_calls`;
    OpenAIError (400) naming the field on bad input."""
    tools = list(tools_field or [])
    _check_tools(tools)
    names = tuple(t.function.name for t in tools)
    max_calls = None if parallel_tool_calls is not False else 1
    if choice is None:
        return ToolPlan(tuple(tools), "auto" if tools else "none", names, max_calls)
    if choice == "none":
        return ToolPlan(tuple(tools), "none")
    if not tools:
        if choice == "auto":
            return ToolPlan()
        raise OpenAIError("'tool_choice' may force a call only when 'tools' are given.", param="tool_choice")
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise OpenAIError(f"tool_choice names {choice.function.name!r}, which is not in 'tools'.", param="tool_choice")
        return ToolPlan(tuple(tools), "required", (choice.function.name,), 1, choice.function.name)
    if isinstance(choice, AllowedToolsChoice):
        allowed = []
        for j, entry in enumerate(choice.allowed_tools.tools):
            if entry.function.name not in names:
                raise OpenAIError(
                    f"allowed_tools names {entry.function.name!r}, which is not in 'tools'.",
                    param=f"tool_choice.allowed_tools.tools[{j}]",
                )
            allowed.append(entry.function.name)
        return ToolPlan(tuple(tools), choice.allowed_tools.mode, tuple(allowed), max_calls)
    return ToolPlan(tuple(tools), choice, names, max_calls)
