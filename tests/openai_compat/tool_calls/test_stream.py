"""Finding tool calls in generated text, whole or in any split: calls, content around them,
malformed calls kept as text, held-back text released."""

from __future__ import annotations

import pytest

from openai_compat.tool_calls.formats import HERMES, LLAMA3_JSON, MISTRAL
from openai_compat.tool_calls.json_scan import Head, JsonValueScanner, match_call_head
from tests.openai_compat.tool_calls.helpers import read, read_every_way

PARIS = {"city": "Paris"}
TRICKY = {"q": 'a "quoted" }] {[ \\ value', "n": [1, {"x": None}], "u": "é 東京"}


def hermes(name: str, args: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>'


def test_hermes_calls_with_text_before_and_between() -> None:
    text = "Let me check both.\n" + hermes("get_weather", '{"city": "Paris"}') + "\n" + hermes("get_time", "{}")
    content, calls = read_every_way(HERMES, text)
    assert content == "Let me check both."  # the newline before the call is the call's
    assert calls == [("get_weather", PARIS), ("get_time", {})]


def test_arguments_stream_as_written_with_strings_holding_brackets() -> None:
    import json

    args = json.dumps(TRICKY, ensure_ascii=False)
    content, calls = read_every_way(HERMES, hermes("get_weather", args))
    assert content == "" and calls == [("get_weather", TRICKY)]
    _, _, deltas = read(HERMES, list(hermes("get_weather", args)))
    pieces = [c.arguments for d in deltas for c in d.calls if c.arguments]
    assert len(pieces) == len(args) and "".join(pieces) == args  # as generated, not at the end


def test_first_delta_of_a_call_has_id_and_name() -> None:
    _, _, deltas = read(HERMES, list(hermes("get_weather", '{"city": "Paris"}')))
    firsts = [c for d in deltas for c in d.calls if c.id is not None]
    assert len(firsts) == 1 and firsts[0].name == "get_weather" and firsts[0].index == 0


@pytest.mark.parametrize("text", [
    "<tool_call> not json </tool_call> after",
    '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>',  # no such function
    '<tool_call>\n{"name": "get_weather", "argu',  # cut short before its arguments
    "<tool_call>[1, 2]</tool_call>",
    '<tool_call>{"arguments": {}, "name": 5}</tool_call>',
])
def test_a_malformed_call_is_text(text: str) -> None:
    content, calls = read_every_way(HERMES, "Answer: " + text)
    assert calls == [] and content == "Answer: " + text


def test_keys_in_another_order_arguments_as_a_string_or_none() -> None:
    text = '<tool_call>{"arguments": {"city": "Paris"}, "name": "get_weather"}</tool_call>'
    assert read_every_way(HERMES, text) == ("", [("get_weather", PARIS)])
    text = '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}</tool_call>'
    assert read_every_way(HERMES, text) == ("", [("get_weather", PARIS)])
    assert read_every_way(HERMES, '<tool_call>{"name": "get_time"}</tool_call>') == ("", [("get_time", {})])


def test_text_that_only_looks_like_a_tag_is_released() -> None:
    assert read_every_way(HERMES, "a <b> and <tool_cal") == ("a <b> and <tool_cal", [])
    _, _, deltas = read(HERMES, ["x <tool", "_ca", "t> y"])
    assert [d.content for d in deltas] == ["x", "", " <tool_cat> y", ""]  # held while it could be the tag


def test_a_text_answer_keeps_its_whitespace() -> None:
    assert read_every_way(HERMES, "  Hello,\n\nworld.\n ") == ("  Hello,\n\nworld.\n ", [])


def test_a_call_cut_short_keeps_what_was_generated() -> None:
    content, calls = read_every_way(HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa')
    assert content == "" and calls == [("get_weather", '{"city": "Pa')]


def test_parallel_calls_off_keeps_the_first() -> None:
    text = hermes("get_weather", "{}") + "\n" + hermes("get_time", "{}")
    assert read_every_way(HERMES, text, max_calls=1) == ("", [("get_weather", {})])


def test_only_callable_functions() -> None:
    text = hermes("get_weather", "{}")
    content, calls = read_every_way(HERMES, text, names=("get_time",))
    assert calls == [] and content == text


def test_llama3_json_whole_answer_and_python_tag() -> None:
    call = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    assert read_every_way(LLAMA3_JSON, call) == ("", [("get_weather", PARIS)])
    two = f'<|python_tag|>{call}; {{"name": "get_time", "parameters": {{}}}}'
    assert read_every_way(LLAMA3_JSON, two) == ("", [("get_weather", PARIS), ("get_time", {})])
    assert read_every_way(LLAMA3_JSON, "\n\n" + call)[1] == [("get_weather", PARIS)]


@pytest.mark.parametrize("text", [
    '{"answer": 42, "unit": "km"}',  # JSON, but not a call
    'It is {"name": "get_weather", "parameters": {}}',  # a call mid-text is not Llama's format
    '{"name": "get_weather", "param',  # cut short before its arguments
])
def test_llama3_json_text(text: str) -> None:
    assert read_every_way(LLAMA3_JSON, text) == (text, [])


def test_llama3_json_cut_short_in_its_arguments() -> None:
    text = ' {"name": "get_weather", "parameters": {"city": "Pa'
    assert read_every_way(LLAMA3_JSON, text) == ("", [("get_weather", '{"city": "Pa')])


def test_mistral_list_of_calls() -> None:
    text = '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]'
    assert read_every_way(MISTRAL, text) == ("", [("get_weather", PARIS), ("get_time", {})])
    assert read_every_way(MISTRAL, "[TOOL_CALLS] nope") == ("[TOOL_CALLS] nope", [])


def test_json_value_scanner_ends() -> None:
    for text, end in [('{"a": "}"} tail', 10), ('"x\\"y" z', 6), ("[1, [2]],", 8), ("12, 3", 2)]:
        scanner = JsonValueScanner()
        assert scanner.feed(text) == end and scanner.done, text
    scanner = JsonValueScanner()
    assert scanner.feed("true") == 4 and not scanner.done and scanner.finish()


def test_call_head() -> None:
    keys = ("arguments",)
    assert match_call_head('{"name": "f", "arguments": {', keys).state is Head.MATCH
    assert match_call_head('{"name": "f", "arguments": {', keys).name == "f"
    assert match_call_head('{ "na', keys).state is Head.PARTIAL
    assert match_call_head('{"name": "f", "argu', keys).state is Head.PARTIAL
    assert match_call_head('{"name": "f", "arguments": ', keys).state is Head.PARTIAL  # the value's start decides
    assert match_call_head('{"id": 1', keys).state is Head.NO
    assert match_call_head('{"name": "f", "parameters": {', keys).state is Head.NO


def test_a_runaway_head_is_text() -> None:
    text = '<tool_call>{"name": "' + "x" * 5000  # a name that never ends: read whole past 256 characters
    _, _, deltas = read(HERMES, list(text))
    assert "".join(d.content for d in deltas) == text and not any(d.calls for d in deltas)
