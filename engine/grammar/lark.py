"""A `StructuredOutput` as the grammar library's input: its top-level grammar, JSON text.

The library (llguidance) takes a list of grammars, the first one the start: a JSON schema,
or a Lark grammar (its dialect: Lark with `%json {...}` for an inline JSON schema, `<name>` or
`<[id]>` for a special token, `[lazy]` for a terminal that matches as few bytes as it can).

- json_schema / json_object: the schema, with `x-guidance` options that fix the whitespace to
  one space after `,` and `:` (no free whitespace: a small model can otherwise emit newlines
  without end inside an object).
- regex: one terminal; choice: one literal per choice.
- grammar: Lark, or GBNF (`root ::= ...`), which is converted to Lark.
- tagged_json: `begin JSON end`, `min_items` to `max_items` times, `separator` between; a
  begin or end that holds a special token of the tokenizer (`<|python_tag|>`, `[TOOL_CALLS]`)
  names that token, so the model produces the token and not its text spelled out.
- start_after: a lazy terminal that takes any text up to and including the first occurrence of
  the string (or the special token of that name), then up to 8 whitespace characters, then the
  constraint as a sub-grammar: generation is free until the string has been produced.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from engine.structured_output import StructuredOutput, TaggedJSON

# JSON layout inside every JSON constraint: what json.dumps writes by default.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_ANY_OBJECT: dict[str, Any] = {"type": "object"}


def top_level_grammar(so: StructuredOutput, special_tokens: Mapping[str, int]) -> str:
    """The llguidance grammar (JSON text) of `so`. `special_tokens` maps the text of each
    special token of the tokenizer to its id. Raises ValueError(message, field) for input the
    grammar cannot be built from (a schema that is not a JSON object)."""
    body = _body(so, special_tokens)
    if so.start_after is None:
        return json.dumps({"grammars": [body]})
    if so.start_after in special_tokens:
        prefix = f"/(?s:.*)/ <[{special_tokens[so.start_after]}]>"
    else:
        prefix = "prefix"
    wrapper = f"start: {prefix} GAP? @constraint\nGAP: /[ \\t\\r\\n]{{1,8}}/\n"
    if prefix == "prefix":
        wrapper += f"prefix[lazy]: /(?s:.*){regex_literal(so.start_after)}/\n"
    return json.dumps({"grammars": [{"lark_grammar": wrapper}, {**body, "name": "constraint"}]})


def _body(so: StructuredOutput, special_tokens: Mapping[str, int]) -> dict[str, Any]:
    if so.json_schema is not None:
        return {"json_schema": with_json_options(_schema_object(so.json_schema, "json_schema"))}
    if so.json_object:
        return {"json_schema": with_json_options(_ANY_OBJECT)}
    if so.regex is not None:
        return {"lark_grammar": f"start: /{_lark_regex(so.regex)}/\n"}
    if so.choice is not None:
        return {"lark_grammar": "start: " + " | ".join(json.dumps(c) for c in so.choice) + "\n"}
    if so.grammar is not None:
        return {"lark_grammar": _to_lark(so.grammar)}
    assert so.tagged_json is not None
    return {"lark_grammar": tagged_json_lark(so.tagged_json, special_tokens)}


def with_json_options(schema: Mapping[str, Any]) -> dict[str, Any]:
    """`schema` with the layout options (`JSON_OPTIONS`); options it sets itself win."""
    options = {**JSON_OPTIONS, **(schema.get("x-guidance") or {})}
    return {**schema, "x-guidance": options}


def _schema_object(text: str, field: str) -> dict[str, Any]:
    try:
        schema = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{field} is not valid JSON: {e}", field) from None
    if isinstance(schema, bool):  # true: anything; false: nothing (refused by the compiler)
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise ValueError(f"{field} must be a JSON object, got {type(schema).__name__}", field)
    return schema


def tagged_json_lark(tagged: TaggedJSON, special_tokens: Mapping[str, int]) -> str:
    """Lark for `begin JSON end`, repeated `min_items`..`max_items` times, `separator` between."""
    schema = with_json_options(_schema_object(tagged.schema, "tagged_json"))
    parts = [_literal(tagged.begin, special_tokens), "%json " + json.dumps(schema), _literal(tagged.end, special_tokens)]
    lines = ["item: " + " ".join(p for p in parts if p)]
    low, high = tagged.min_items, tagged.max_items
    if high is not None and high < low:
        raise ValueError(f"max_items ({high}) is below min_items ({low})", "tagged_json")
    if high == 0:
        return 'start: ""\n'
    separator = _literal(tagged.separator, special_tokens)
    if separator:  # the first item, then the others each after a separator
        rest_low, rest_high = max(low - 1, 0), None if high is None else high - 1
        items = "item" if rest_high == 0 else f"item ({separator} item){_repeat(rest_low, rest_high)}"
    else:  # (the library refuses a range that ends at 0)
        items = "item" if high == 1 else f"item{_repeat(max(low, 1), high)}"
    lines.insert(0, f"start: {items}" if low > 0 else f"start: ({items})?")
    return "\n".join(lines) + "\n"


def _repeat(low: int, high: int | None) -> str:
    return f"{{{low},{'' if high is None else high}}}"


def _literal(text: str, special_tokens: Mapping[str, int]) -> str:
    """Lark items that match `text`: string literals, and `<[id]>` for each special token in it."""
    items: list[str] = []
    rest = text
    while rest:
        at, token = _first_special(rest, special_tokens)
        if token is None:
            items.append(json.dumps(rest))
            break
        if at:
            items.append(json.dumps(rest[:at]))
        items.append(f"<[{special_tokens[token]}]>")
        rest = rest[at + len(token) :]
    return " ".join(items)


def _first_special(text: str, special_tokens: Mapping[str, int]) -> tuple[int, str | None]:
    """(where, which) of the first special token in `text` (the longest at that place)."""
    best: tuple[int, str | None] = (len(text), None)
    for token in special_tokens:
        at = text.find(token)
        if at != -1 and (at < best[0] or (at == best[0] and best[1] is not None and len(token) > len(best[1]))):
            best = (at, token)
    return best


def regex_literal(text: str) -> str:
    """A regex (the library's syntax, inside /.../) that matches exactly `text`."""
    return "".join(ch if ch.isalnum() or ord(ch) > 127 else f"\\x{ord(ch):02x}" for ch in text)


def _lark_regex(regex: str) -> str:
    """`regex` made safe between Lark's slashes: a slash not already escaped gets a backslash."""
    out: list[str] = []
    escaped = False
    for ch in regex:
        if ch == "/" and not escaped:
            out.append("\\/")
        else:
            out.append(ch)
        escaped = ch == "\\" and not escaped
    return "".join(out)


def _to_lark(grammar: str) -> str:
    """Lark text of a Lark or GBNF grammar (GBNF: rules written `name ::= ...`)."""
    if "::=" not in grammar:
        return grammar
    from llguidance.gbnf_to_lark import any_to_lark

    try:
        return str(any_to_lark(grammar))
    except Exception as e:  # the converter's own exceptions, e.g. a rule it cannot parse
        raise ValueError(f"grammar is not valid GBNF: {e}", "grammar") from None
