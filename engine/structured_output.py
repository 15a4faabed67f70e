"""What a request's output must look like: a JSON schema, a regular expression, a grammar.

A `StructuredOutput` names exactly one constraint. The engine compiles it once (cached by
its content) and, at every step, lets the sampler choose only tokens that keep the output a
prefix of a string the constraint accepts; generation ends when the constraint is complete
and only the end of the text may follow.

`TaggedJSON` is the shape of tool calls: `begin` + a JSON value that matches `schema` +
`end`, repeated (parallel calls) between `min_items` and `max_items` times. A chat parser
that writes calls as `<tool_call>{...}</tool_call>` or `[TOOL_CALLS][...]` describes its
format with it, and the grammar layer turns it into whatever its library takes.

With `start_after`, the constraint applies only once the generated text contains that
string (a reasoning model's `</think>`): what comes before is unconstrained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TaggedJSON:
    begin: str  # text before each item, e.g. "<tool_call>\n"
    schema: str  # JSON text of the JSON schema each item matches
    end: str  # text after each item, e.g. "\n</tool_call>"
    min_items: int = 1
    max_items: int | None = None  # None: no bound
    separator: str = ""  # text between items


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    json_schema: str | None = None  # JSON text of a JSON schema
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: tuple[str, ...] | None = None  # exactly one of these strings
    grammar: str | None = None  # an EBNF grammar (the dialect is the grammar layer's)
    tagged_json: TaggedJSON | None = None
    start_after: str | None = None  # unconstrained until the output contains this text

    def __post_init__(self) -> None:
        kinds = [
            name
            for name, value in (
                ("json_schema", self.json_schema),
                ("json_object", self.json_object or None),
                ("regex", self.regex),
                ("choice", self.choice),
                ("grammar", self.grammar),
                ("tagged_json", self.tagged_json),
            )
            if value is not None
        ]
        if len(kinds) != 1:
            raise ValueError(
                f"a structured output names exactly one constraint, got {kinds or 'none'}", "structured_output"
            )
        if self.json_schema is not None:
            try:
                json.loads(self.json_schema)
            except ValueError as e:
                raise ValueError(f"json_schema is not valid JSON: {e}", "json_schema") from None
        if self.choice is not None and not self.choice:
            raise ValueError("choice must hold at least one string", "choice")
        if self.start_after == "":
            raise ValueError("start_after must not be empty", "start_after")

    @property
    def kind(self) -> str:
        """The one constraint's field name."""
        for name in ("json_schema", "regex", "choice", "grammar", "tagged_json"):
            if getattr(self, name) is not None:
                return name
        return "json_object"
