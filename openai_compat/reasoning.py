"""Reasoning models: their thinking (`reasoning_content`) apart from their answer (`content`).

Models of the Qwen3 and DeepSeek-R1 lines think inside `<think>...</think>` before they answer.
`ReasoningStream` splits one choice's text as it streams: the thinking without its tags and
the whitespace around it, then the answer. Where the thinking starts depends on the prompt
(`ReasoningFormat.start_state`): a template that opens `<think>` itself (DeepSeek-R1) leaves
the model inside it; one that closed it (Qwen3 with `enable_thinking` false) leaves only an
answer; otherwise the answer may open with `<think>`.

`select_reasoning` picks the format from `--reasoning-parser` or, with `auto`, from the chat
template (one that mentions `</think>`).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)

_WHITESPACE = " \t\r\n"


class Start(enum.Enum):
    MAYBE = 0  # the answer may open with the start tag
    THINKING = 1  # the prompt opened the start tag
    ANSWER = 2  # the prompt closed the thinking: no reasoning


@dataclass(frozen=True, slots=True)
class ReasoningFormat:
    start: str = "<think>"
    end: str = "</think>"

    def start_state(self, prompt_text: str) -> Start:
        tail = prompt_text.rstrip(_WHITESPACE)
        if tail.endswith(self.start):
            return Start.THINKING
        if tail.endswith(self.end):
            return Start.ANSWER
        return Start.MAYBE


THINK = ReasoningFormat()


def select_reasoning(setting: str, template: str) -> ReasoningFormat | None:
    """The format named by `--reasoning-parser` (`think`, `none`), or with `auto` the template's."""
    if setting == "none":
        return None
    if setting == "think":
        return THINK
    if THINK.end in template:
        logger.info("reasoning: %s...%s split from the answer (from the chat template)", THINK.start, THINK.end)
        return THINK
    return None


@dataclass(slots=True)
class ReasoningDelta:
    reasoning: str = ""
    content: str = ""


class ReasoningStream:
    """One choice's text split into thinking and answer, fed piece by piece."""

    def __init__(self, fmt: ReasoningFormat, start: Start) -> None:
        self.fmt = fmt
        self._state = start
        self._buf = ""
        self._pending_ws = ""  # the thinking's trailing whitespace, held
        self._lstrip = start is Start.THINKING  # drop whitespace at the start of a part

    def feed(self, text: str) -> ReasoningDelta:
        self._buf += text
        out = ReasoningDelta()
        while self._buf and self._step(out):
            pass
        return out

    def finish(self) -> ReasoningDelta:
        out = self.feed("")
        if self._state is Start.THINKING:
            out.reasoning += self._pending_ws + self._buf
        elif not self._lstrip:
            out.content += self._buf
        self._buf = self._pending_ws = ""
        return out

    def _step(self, out: ReasoningDelta) -> bool:
        if self._lstrip:
            self._buf = self._buf.lstrip(_WHITESPACE)
            if not self._buf:
                return False
            self._lstrip = False
        start, end = self.fmt.start, self.fmt.end
        if self._state is Start.MAYBE:
            body = self._buf.lstrip(_WHITESPACE)
            if body.startswith(start):
                self._buf = body[len(start):]
                self._state, self._lstrip = Start.THINKING, True
                return True
            if start.startswith(body):
                return False  # whitespace or a part of the tag: wait
            self._state = Start.ANSWER
        if self._state is Start.ANSWER:
            out.content += self._buf
            self._buf = ""
            return False
        i = self._buf.find(end)
        if i >= 0:
            self._think(self._buf[:i], out)
            self._pending_ws = ""  # whitespace before the end tag belongs to no one
            self._buf = self._buf[i + len(end):]
            self._state, self._lstrip = Start.ANSWER, True
            return True
        held = next((n for n in range(min(len(end) - 1, len(self._buf)), 0, -1) if self._buf.endswith(end[:n])), 0)
        self._think(self._buf[: len(self._buf) - held], out)
        self._buf = self._buf[len(self._buf) - held:]
        return False

    def _think(self, text: str, out: ReasoningDelta) -> None:
        text = self._pending_ws + text
        body = text.rstrip(_WHITESPACE)
        self._pending_ws = text[len(body):]
        out.reasoning += body
