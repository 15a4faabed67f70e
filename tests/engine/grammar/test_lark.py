"""The grammar text a StructuredOutput becomes, through what the model may then produce."""

from __future__ import annotations

import json
from typing import Any

import pytest

from engine.grammar import GrammarCompiler, GrammarMatcher, GrammarTokenizer
from engine.grammar.lark import JSON_OPTIONS, top_level_grammar, with_json_options
from engine.structured_output import StructuredOutput, TaggedJSON
from tests.engine.grammar.walk import allowed, encode, walk


def _walks(compiler: GrammarCompiler, tokenizer: Any, text: str, **kw: Any) -> bool:
    m = GrammarMatcher(compiler.compile(StructuredOutput(**kw)), compiler.tokenizer)
    return walk(m, compiler.tokenizer, encode(tokenizer, text)) is None and m.is_accepting


def test_json_layout_is_json_dumps_default(compiler: GrammarCompiler, tiny_tokenizer: Any) -> None:
    schema = json.dumps({"type": "object", "properties": {"a": {"type": "array"}}})
    assert _walks(compiler, tiny_tokenizer, '{"a": [1, 2]}', json_schema=schema)
    assert not _walks(compiler, tiny_tokenizer, '{"a":[1,2]}', json_schema=schema)
    assert not _walks(compiler, tiny_tokenizer, '{\n  "a": []\n}', json_schema=schema)
    # a schema's own layout options win
    assert with_json_options({"x-guidance": {"item_separator": ","}})["x-guidance"] == {**JSON_OPTIONS, "item_separator": ","}


def test_regex_slashes_and_start_after_metacharacters(compiler: GrammarCompiler, tiny_tokenizer: Any) -> None:
    assert _walks(compiler, tiny_tokenizer, "2024/12/07", regex=r"\d{4}/\d{2}/\d{2}")
    assert _walks(compiler, tiny_tokenizer, "x\\/y", regex=r"x\\/y")  # an escaped backslash, then a slash
    marker = "[END](.*)/"
    assert _walks(compiler, tiny_tokenizer, f"free text {marker}42", regex="[0-9]+", start_after=marker)
    assert not _walks(compiler, tiny_tokenizer, "free text [END]X42", regex="[0-9]+", start_after=marker)


def test_special_tokens_in_tags_are_the_tokens(compiler: GrammarCompiler, tiny_tokenizer: Any) -> None:
    gt: GrammarTokenizer = compiler.tokenizer
    start, end = tiny_tokenizer.convert_tokens_to_ids(["<|im_start|>", "<filename>"])
    tagged = TaggedJSON(begin="<|im_start|>call ", schema='{"type": "integer"}', end=" <filename>")
    grammar = top_level_grammar(StructuredOutput(tagged_json=tagged), gt.special_tokens)
    assert f"<[{start}]>" in grammar and f"<[{end}]>" in grammar
    m = GrammarMatcher(compiler.compile(StructuredOutput(tagged_json=tagged)), gt)
    assert allowed(m, gt).nonzero().flatten().tolist() == [start]  # the token itself, not its text
    assert m.accept(start) and walk(m, gt, encode(tiny_tokenizer, "call 12 ")) is None
    assert m.accept(end) and m.is_accepting


def test_tagged_json_without_separator_and_with_none(compiler: GrammarCompiler, tiny_tokenizer: Any) -> None:
    tagged = TaggedJSON(begin="<", schema='{"type": "boolean"}', end=">", min_items=2, max_items=3)
    assert _walks(compiler, tiny_tokenizer, "<true><false>", tagged_json=tagged)
    assert not _walks(compiler, tiny_tokenizer, "<true>", tagged_json=tagged)  # fewer than 2
    nothing = TaggedJSON(begin="<", schema='{"type": "boolean"}', end=">", min_items=0, max_items=0)
    m = GrammarMatcher(compiler.compile(StructuredOutput(tagged_json=nothing)), compiler.tokenizer)
    assert allowed(m, compiler.tokenizer).nonzero().flatten().tolist() == [tiny_tokenizer.eos_token_id]


@pytest.mark.parametrize("separator", ["", "\n"], ids=["no-separator", "separator"])
def test_tagged_json_of_exactly_one_item(compiler: GrammarCompiler, tiny_tokenizer: Any, separator: str) -> None:
    """A single call (a named tool_choice, or parallel_tool_calls false): one item, no second."""
    one = TaggedJSON(begin="<", schema='{"type": "boolean"}', end=">", max_items=1, separator=separator)
    assert _walks(compiler, tiny_tokenizer, "<true>", tagged_json=one)
    assert not _walks(compiler, tiny_tokenizer, f"<true>{separator}<false>", tagged_json=one)
    assert not _walks(compiler, tiny_tokenizer, "", tagged_json=one)
