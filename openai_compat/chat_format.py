"""What the model's chat template implies for tools and thinking, found once per tokenizer.

`ChatFormat` knows the tool-call format (`--tool-call-parser`, or the template's), the
reasoning format (`--reasoning-parser`, or the template's), whether the template has a place
for tools, and which texts are special tokens (that decoding would drop unless told not to).
For one request it prepares the conversation for the template, says how to read the answer
(`reader`), and where a constraint starts (`start_after`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from engine import SamplingParams, StructuredOutput
from openai_compat.chat_output import OutputReader
from openai_compat.reasoning import ReasoningFormat, Start, select_reasoning
from openai_compat.tool_calls.formats import ToolFormat, select_format, template_has_tools, template_source
from openai_compat.tool_calls.rendering import prepare_conversation
from openai_compat.tool_calls.request import ToolPlan


@dataclass(frozen=True)
class ChatFormat:
    tool_format: ToolFormat
    reasoning: ReasoningFormat | None
    template_has_tools: bool
    special_texts: frozenset[str]  # the text of every token that decoding skips

    @staticmethod
    @lru_cache(maxsize=4)
    def of(tokenizer: Any, tool_call_parser: str = "auto", reasoning_parser: str = "auto") -> ChatFormat:
        template = template_source(getattr(tokenizer, "chat_template", None))
        return ChatFormat(
            select_format(tool_call_parser, template),
            select_reasoning(reasoning_parser, template),
            template_has_tools(template),
            special_token_texts(tokenizer),
        )

    def conversation(
        self, messages: list[dict[str, Any]], plan: ToolPlan, template_kwargs: dict[str, Any] | None
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """The messages and `tools=` for the template (a request's own template decides
        whether tools have a place)."""
        own = (template_kwargs or {}).get("chat_template")
        has_tools = template_has_tools(own) if isinstance(own, str) else self.template_has_tools
        return prepare_conversation(messages, plan, self.tool_format, has_tools)

    def _reasoning_start(self, prompt_text: str) -> Start:
        return self.reasoning.start_state(prompt_text) if self.reasoning is not None else Start.ANSWER

    def reader(self, plan: ToolPlan, prompt_text: str) -> OutputReader:
        """How the answer to this prompt is read."""
        start = self._reasoning_start(prompt_text)
        return OutputReader(
            tool_format=self.tool_format if plan.parses_calls else None,
            callable=plan.callable,
            max_calls=plan.max_calls,
            reasoning=self.reasoning if start is not Start.ANSWER else None,
            reasoning_start=start,
        )

    def start_after(self, prompt_text: str) -> str | None:
        """Where a constraint on the answer starts: after the thinking, if the model thinks."""
        if self.reasoning is None or self._reasoning_start(prompt_text) is Start.ANSWER:
            return None
        return self.reasoning.end

    def keeps_special_tokens(self, reader: OutputReader) -> bool:
        """Whether reading the answer needs a special token's text (Llama's `<|python_tag|>`)."""
        texts: list[str] = []
        if reader.tool_format is not None:
            syntax = reader.tool_format.syntax
            texts += [*syntax.triggers, syntax.open, syntax.close or ""]
        if reader.reasoning is not None:
            texts += [reader.reasoning.start, reader.reasoning.end]
        return any(text in self.special_texts for text in texts if text)


def special_token_texts(tokenizer: Any) -> frozenset[str]:
    """The texts of a tokenizer's tokens that `decode(skip_special_tokens=True)` drops."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return frozenset(getattr(tokenizer, "all_special_tokens", ()))
    return frozenset(added.content for added in backend.get_added_tokens_decoder().values() if added.special)


def apply_constraint(params: SamplingParams, constraint: StructuredOutput | None) -> None:
    """Hand a request's constraint to the engine (which compiles it first: `compile_constraint`)."""
    params.structured_output = constraint
