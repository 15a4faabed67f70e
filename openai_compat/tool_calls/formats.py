"""The tool-call formats models write, each described once: how to find its calls in the text
(`CallSyntax`), how to force them (`TaggedJSON`), how to write them in a prompt.

- `hermes`: `<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`, one tag pair per
  call (Qwen2, Qwen2.5, Qwen3, Hermes, and the format lightgate tells models whose chat
  template has no place for tools).
- `llama3_json`: `{"name": "f", "parameters": {...}}` as the whole answer, optionally after
  `<|python_tag|>`, several calls separated by `; ` (Llama 3.1, 3.2, 3.3).
- `mistral`: `[TOOL_CALLS] [{"name": "f", "arguments": {...}}, ...]` (Mistral 7B v0.3, Mixtral,
  Nemo, Small: the tokenizers whose templates write `[TOOL_CALLS] [`). Their templates
  require tool call ids of 9 letters and digits: the history's ids are shortened to their last
  9 (lightgate's own ids end in 24 hex digits, so a call and its result still match).

`select_format` picks one from `--tool-call-parser` or, with `auto`, from the chat template.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from engine import TaggedJSON
from openai_compat.tool_calls.stream import CallSyntax

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class ToolFormat:
    """Hermes: one `<tool_call>` tag pair per call (the base the other formats vary)."""

    name: str = "hermes"
    syntax: CallSyntax = CallSyntax(triggers=("<tool_call>",), close="</tool_call>")
    arguments_key: str = "arguments"  # the key the format writes arguments under
    # Its trigger is a special token in some tokenizers: the text must keep special tokens.
    keeps_special_tokens: bool = True

    def items(self, calls: list[tuple[str, Any]]) -> list[dict[str, Any]]:
        return [{"name": name, self.arguments_key: arguments} for name, arguments in calls]

    def render_calls(self, calls: list[tuple[str, Any]]) -> str:
        """An assistant turn's calls (name, arguments) as the model writes them."""
        return "\n".join(f"<tool_call>\n{_dumps(item)}\n</tool_call>" for item in self.items(calls))

    def how_to_call(self) -> str:
        return "reply with a JSON object holding its name and arguments inside <tool_call></tool_call> tags, one pair per call"

    def instructions(self) -> str:
        """How to call a function, told to a model whose template has no place for tools."""
        example = self.render_calls([("function_name", {"argument": "value"})])
        return f"To call a function, {self.how_to_call()}:\n{example}"

    def tagged_json(self, item_schema: dict[str, Any], min_items: int, max_items: int | None) -> TaggedJSON:
        """The shape of `min_items` to `max_items` calls, each matching `item_schema`."""
        return TaggedJSON(begin="<tool_call>\n", schema=_dumps(item_schema), end="\n</tool_call>",
                          min_items=min_items, max_items=max_items, separator="\n")

    def prepare_history(self, messages: list[dict[str, Any]]) -> None:
        """Adapt the history to what the format's own template requires (in place)."""


@dataclass(frozen=True)
class Llama3JsonFormat(ToolFormat):
    name: str = "llama3_json"
    syntax: CallSyntax = CallSyntax(triggers=("<|python_tag|>",), item_trigger="{", start_only=True, separator=";")
    arguments_key: str = "parameters"

    def render_calls(self, calls: list[tuple[str, Any]]) -> str:
        return "; ".join(_dumps(item) for item in self.items(calls))

    def how_to_call(self) -> str:
        return 'reply with only a JSON object holding its name and parameters (separate several calls with "; ")'

    def tagged_json(self, item_schema: dict[str, Any], min_items: int, max_items: int | None) -> TaggedJSON:
        return TaggedJSON(begin="", schema=_dumps(item_schema), end="", min_items=min_items, max_items=max_items,
                          separator="; ")


@dataclass(frozen=True)
class MistralFormat(ToolFormat):
    name: str = "mistral"
    syntax: CallSyntax = CallSyntax(triggers=("[TOOL_CALLS]",), open="[", separator=",", close="]")

    def render_calls(self, calls: list[tuple[str, Any]]) -> str:
        return "[TOOL_CALLS] " + _dumps(self.items(calls))

    def how_to_call(self) -> str:
        return "reply with [TOOL_CALLS] and a JSON list of the calls, each with its name and arguments"

    def tagged_json(self, item_schema: dict[str, Any], min_items: int, max_items: int | None) -> TaggedJSON:
        # One item: the list of calls, its length bounded by the schema.
        array: dict[str, Any] = {"type": "array", "items": item_schema, "minItems": min_items}
        if max_items is not None:
            array["maxItems"] = max_items
        return TaggedJSON(begin="[TOOL_CALLS] ", schema=_dumps(array), end="", min_items=1, max_items=1)

    def prepare_history(self, messages: list[dict[str, Any]]) -> None:
        for message in messages:
            for call in message.get("tool_calls") or ():
                if isinstance(call.get("id"), str):
                    call["id"] = mistral_call_id(call["id"])
            if isinstance(message.get("tool_call_id"), str):
                message["tool_call_id"] = mistral_call_id(message["tool_call_id"])


def mistral_call_id(call_id: str) -> str:
    """The 9 letters and digits Mistral's templates take for an id: its last 9 (zero-padded)."""
    return re.sub(r"[^A-Za-z0-9]", "", call_id)[-9:].rjust(9, "0")


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


HERMES = ToolFormat()
LLAMA3_JSON = Llama3JsonFormat()
MISTRAL = MistralFormat()
FORMATS: dict[str, ToolFormat] = {f.name: f for f in (HERMES, LLAMA3_JSON, MISTRAL)}


def template_source(template: str | dict[str, str] | None) -> str:
    """All of a tokenizer's chat template text (some ship several, by name)."""
    if isinstance(template, dict):
        return "\n".join(str(t) for t in template.values())
    return template or ""


def detect_format(template: str) -> ToolFormat:
    """The format a chat template writes calls in; Hermes when it writes none."""
    if "[TOOL_CALLS]" in template:
        return MISTRAL
    if "<tool_call>" in template:
        return HERMES
    if "<|python_tag|>" in template or ("<|start_header_id|>" in template and '"parameters"' in template):
        return LLAMA3_JSON
    return HERMES


def select_format(setting: str, template: str) -> ToolFormat:
    """The format named by `--tool-call-parser`, or with `auto` the template's."""
    if setting != "auto":
        return FORMATS[setting]
    chosen = detect_format(template)
    logger.info("tool calls: the %s format (from the chat template)", chosen.name)
    return chosen


def template_has_tools(template: str) -> bool:
    """Whether the chat template has a place for tool definitions: it mentions `tools`."""
    return "tools" in template
