"""Reading a chat answer: thinking, content and tool calls out of one choice's generated text.

`OutputReader` is what a request needs read (calls in a format, thinking in tags, both, or
neither); each choice gets a `ChoiceReader` that splits the thinking off first, then finds
the calls in the rest. The streamed response turns each piece into OpenAI's deltas
(`deltas`); the whole response sums them into one message (`ChoiceMessage`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from openai_compat.protocol import (
    ChatResponseMessage,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
)
from openai_compat.reasoning import ReasoningFormat, ReasoningStream, Start
from openai_compat.tool_calls.formats import ToolFormat
from openai_compat.tool_calls.stream import CallDelta, CallStream


@dataclass(slots=True)
class ChoiceDelta:
    reasoning: str = ""
    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)


@dataclass(frozen=True)
class OutputReader:
    """How a request's generated text is read."""

    tool_format: ToolFormat | None = None  # None: the text is not read for calls
    callable: tuple[str, ...] = ()
    max_calls: int | None = None
    reasoning: ReasoningFormat | None = None
    reasoning_start: Start = Start.MAYBE

    @property
    def active(self) -> bool:
        return self.tool_format is not None or self.reasoning is not None

    def choice(self) -> ChoiceReader:
        return ChoiceReader(self)


class ChoiceReader:
    def __init__(self, spec: OutputReader) -> None:
        self._thinking = ReasoningStream(spec.reasoning, spec.reasoning_start) if spec.reasoning else None
        self._calls = (
            CallStream(spec.tool_format.syntax, spec.callable, spec.max_calls) if spec.tool_format is not None else None
        )

    @property
    def num_calls(self) -> int:
        return self._calls.num_calls if self._calls is not None else 0

    def feed(self, text: str) -> ChoiceDelta:
        return self._read(text, finish=False)

    def finish(self) -> ChoiceDelta:
        return self._read("", finish=True)

    def _read(self, text: str, finish: bool) -> ChoiceDelta:
        out = ChoiceDelta()
        if self._thinking is not None:
            split = self._thinking.finish() if finish else self._thinking.feed(text)
            out.reasoning, text = split.reasoning, split.content
        if self._calls is None:
            out.content = text
            return out
        parsed = self._calls.feed(text)
        if finish:
            parsed.extend(self._calls.finish())
        out.content, out.calls = parsed.content, parsed.calls
        return out


def deltas(piece: ChoiceDelta) -> list[DeltaMessage]:
    """A piece of a choice as OpenAI streams it: the text, then one delta per call piece (the
    first of a call with its index, id, type, name and empty arguments)."""
    out = []
    if piece.reasoning or piece.content:
        out.append(DeltaMessage(reasoning_content=piece.reasoning or None, content=piece.content or None))
    for call in piece.calls:
        if call.id is not None:
            out.append(DeltaMessage(tool_calls=[DeltaToolCall(
                index=call.index, id=call.id, type="function",
                function=DeltaFunctionCall(name=call.name, arguments=""),
            )]))
        if call.arguments:
            out.append(DeltaMessage(tool_calls=[DeltaToolCall(
                index=call.index, function=DeltaFunctionCall(arguments=call.arguments),
            )]))
    return out


@dataclass(slots=True)
class ChoiceMessage:
    """A whole choice summed from its pieces."""

    reasoning: str = ""
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)

    def add(self, piece: ChoiceDelta) -> None:
        self.reasoning += piece.reasoning
        self.content += piece.content
        for call in piece.calls:
            if call.id is not None:
                self.calls.append(ToolCall(id=call.id, function=FunctionCall(name=call.name or "", arguments="")))
            self.calls[call.index].function.arguments += call.arguments

    def message(self, reads_reasoning: bool) -> ChatResponseMessage:
        """content null when the turn is only calls; reasoning_content only where read and found."""
        return ChatResponseMessage(
            content=None if self.calls and not self.content else self.content,
            tool_calls=self.calls or None,
            reasoning_content=self.reasoning if reads_reasoning and self.reasoning else None,
        )


def finish_reason_with_calls(reason: str, num_calls: int) -> str:
    """`tool_calls` for a turn that stopped after making calls, as OpenAI reports it."""
    return "tool_calls" if num_calls and reason == "stop" else reason
