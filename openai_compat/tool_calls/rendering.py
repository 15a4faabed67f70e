"""Tools in the prompt: the conversation and `tools=` as the chat template takes them.

A template with a place for tools (it mentions `tools`) gets them as transformers passes them
(`apply_chat_template(..., tools=[{"type": "function", "function": {...}}])`), and the history's
calls with their arguments as objects, which is what templates write with `tojson`.

A template without one (the embedded default's) would drop them silently. Instead, the
definitions go into the system message (after the request's own system text, if any):

    # Tools

    You may call the functions defined below, one JSON object per line:
    <tools>
    {"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}}
    </tools>

    To call a function, reply with ... (the tool-call format's own instructions and example)

followed by a line for a forced choice (`required`, a named function, at most one call, or
`none`). The history is written the same way: an assistant turn's calls become its text in
the format (`<tool_call>...</tool_call>` for Hermes) and tool results become user turns of
`<tool_response>\\n...\\n</tool_response>`, consecutive results in one turn.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from openai_compat.tool_calls.formats import ToolFormat
from openai_compat.tool_calls.request import ToolPlan

logger = logging.getLogger(__name__)

_warned_no_tool_slot = False


def prepare_conversation(
    messages: list[dict[str, Any]], plan: ToolPlan, tool_format: ToolFormat, template_has_tools: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages (from `template_messages`) and the `tools=` argument for the template."""
    for message in messages:
        for call in message.get("tool_calls") or ():
            function = call["function"]
            function["arguments"] = _arguments_object(function["arguments"])
    if template_has_tools:
        tool_format.prepare_history(messages)
        return messages, [t.model_dump(exclude_none=True) for t in plan.tools] or None
    messages = _history_as_text(messages, tool_format)
    if plan.tools:
        _warn_once()
        messages = _with_system_text(messages, tools_system_text(plan, tool_format))
    return messages, None


def tools_system_text(plan: ToolPlan, tool_format: ToolFormat) -> str:
    """The tools' definitions and how to call them, for a system message."""
    lines = "\n".join(json.dumps(t.model_dump(exclude_none=True), ensure_ascii=False) for t in plan.tools)
    text = (
        "# Tools\n\nYou may call the functions defined below, one JSON object per line:\n"
        f"<tools>\n{lines}\n</tools>\n\n{tool_format.instructions()}"
    )
    if plan.mode == "none":
        return text + "\n\nDo not call any function in this reply."
    if plan.named is not None:
        return text + f"\n\nIn this reply, call the function {plan.named}."
    if plan.mode == "required":
        which = "one of these functions" if len(plan.callable) == len(plan.tools) else "one of: " + ", ".join(plan.callable)
        text += f"\n\nIn this reply, call {which}."
    if plan.max_calls == 1:
        text += "\n\nCall at most one function per reply."
    return text


def _arguments_object(arguments: Any) -> Any:
    """Arguments sent as JSON text, as an object (kept as text when they are not JSON)."""
    if not isinstance(arguments, str):
        return arguments
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def _history_as_text(messages: list[dict[str, Any]], tool_format: ToolFormat) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    after_results = False  # the last message out is a user turn of tool results
    for message in messages:
        calls = message.pop("tool_calls", None)
        if calls:
            written = tool_format.render_calls([(c["function"]["name"], c["function"]["arguments"]) for c in calls])
            content = message.get("content") or ""
            message["content"] = f"{content}\n{written}" if content else written
        if message["role"] != "tool":
            out.append(message)
            after_results = False
            continue
        result = f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"
        if after_results:
            out[-1]["content"] += "\n" + result
        else:
            out.append({"role": "user", "content": result})
            after_results = True
    return out


def _with_system_text(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        own = first.get("content") or ""
        return [{**first, "content": f"{own}\n\n{text}" if own else text}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def _warn_once() -> None:
    global _warned_no_tool_slot
    if not _warned_no_tool_slot:
        _warned_no_tool_slot = True
        logger.warning(
            "the chat template has no place for tools: their definitions go into the system message "
            "(docs/tools.md)"
        )
