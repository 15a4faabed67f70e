"""Reading JSON as it is generated: where a value ends, and a tool call's head.

A tool call streams as `{"name": "f", "arguments": {...}}` a few characters at a time. Its
arguments go to the client as they come, so the parser needs to know, without waiting for the
whole text, where the arguments value ends (`JsonValueScanner`: brackets and strings counted,
nothing else checked) and whether the text so far can still be, or already is, the head
`{"name": "f", "arguments": ` (`match_call_head`).
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass

_WHITESPACE = " \t\r\n"
_SCALAR_END = _WHITESPACE + ",]}"


@dataclass(slots=True)
class JsonValueScanner:
    """Finds the end of one JSON value fed piece by piece. `inside` starts it within an
    object or array already opened (depth 1): it then ends where that container closes."""

    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    started: bool = False
    scalar: bool = False  # a number, true, false or null: ends at the next delimiter
    done: bool = False

    @classmethod
    def inside(cls) -> JsonValueScanner:
        return cls(depth=1, started=True)

    def feed(self, text: str) -> int:
        """How many characters of `text` belong to the value (all of them unless it ended)."""
        for i, ch in enumerate(text):
            if self.done:
                return i
            if not self.started:
                if ch in _WHITESPACE:
                    continue
                self.started = True
                if ch in "{[":
                    self.depth = 1
                elif ch == '"':
                    self.in_string = True
                else:
                    self.scalar = True
                continue
            if self.scalar:
                if ch in _SCALAR_END:
                    self.done = True
                    return i
                continue
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
                    self.done = self.depth == 0
                continue
            if ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                self.done = self.depth == 0
        return len(text)

    def finish(self) -> bool:
        """At the end of the text: whether the value is complete (a scalar ends there)."""
        if self.scalar and self.started:
            self.done = True
        return self.done


class Head(enum.Enum):
    PARTIAL = 0  # the text so far can still become a call's head
    MATCH = 1
    NO = 2  # it cannot: not a call in the expected shape


@dataclass(frozen=True, slots=True)
class HeadMatch:
    state: Head
    name: str = ""
    end: int = 0  # with MATCH: where the arguments value starts


def match_call_head(text: str, argument_keys: tuple[str, ...]) -> HeadMatch:
    """Whether `text` starts with `{"name": "<name>", "<key>": ` (any whitespace between the
    tokens, `<key>` one of `argument_keys`), could still become that, or cannot."""
    pos = 0
    for expected in ("{", '"name"', ":"):
        pos, state = _literal(text, pos, (expected,))
        if state is not Head.MATCH:
            return HeadMatch(state)
    pos = _skip_space(text, pos)
    if pos == len(text):
        return HeadMatch(Head.PARTIAL)
    if text[pos] != '"':
        return HeadMatch(Head.NO)
    end = _string_end(text, pos)
    if end < 0:
        return HeadMatch(Head.PARTIAL)
    try:
        name = json.loads(text[pos:end])
    except ValueError:
        return HeadMatch(Head.NO)
    pos = end
    for options in ((",",), tuple(f'"{key}"' for key in argument_keys), (":",)):
        pos, state = _literal(text, pos, options)
        if state is not Head.MATCH:
            return HeadMatch(state)
    pos = _skip_space(text, pos)
    if pos == len(text):
        return HeadMatch(Head.PARTIAL)  # the value's first character decides nothing yet, but wait for it
    return HeadMatch(Head.MATCH, name, pos)


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WHITESPACE:
        pos += 1
    return pos


def _literal(text: str, pos: int, options: tuple[str, ...]) -> tuple[int, Head]:
    pos = _skip_space(text, pos)
    rest = text[pos:]
    for option in options:
        if rest.startswith(option):
            return pos + len(option), Head.MATCH
    if any(option.startswith(rest) for option in options):
        return pos, Head.PARTIAL
    return pos, Head.NO


def _string_end(text: str, start: int) -> int:
    """The index after the closing quote of the string opening at `start`, or -1."""
    i = start + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == '"':
            return i + 1
        i += 1
    return -1
