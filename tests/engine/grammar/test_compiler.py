"""GrammarCompiler: errors that name the field and the feature, the cache, bounded compile time."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from engine.grammar import GrammarCompiler, GrammarMatcher, GrammarTokenizer
from engine.structured_output import StructuredOutput, TaggedJSON
from tests.engine.grammar.walk import encode, walk


def test_the_cache_is_keyed_by_the_constraint_content(compiler: GrammarCompiler) -> None:
    schema = json.dumps({"type": "object", "properties": {"a": {"type": "string"}}})
    first = compiler.compile(StructuredOutput(json_schema=schema))
    assert compiler.compile(StructuredOutput(json_schema=schema)) is first  # an equal constraint, a new object
    assert compiler.compile(StructuredOutput(json_schema=schema, start_after="</think>")) is not first


def test_the_cache_forgets_the_least_recently_used(grammar_tokenizer: GrammarTokenizer) -> None:
    compiler = GrammarCompiler(grammar_tokenizer, cache_size=2)
    a, b, c = (StructuredOutput(choice=(x,)) for x in "abc")
    first_a = compiler.compile(a)
    compiler.compile(b)
    assert compiler.compile(a) is first_a  # a used again: b is now the oldest
    compiler.compile(c)
    assert compiler.compile(a) is first_a
    assert len(compiler._cache) == 2 and b not in compiler._cache


@pytest.mark.parametrize(
    ("so", "field", "words"),
    [
        (StructuredOutput(json_schema='{"type": "array", "uniqueItems": true}'), "json_schema", ["uniqueItems"]),
        (StructuredOutput(json_schema='{"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}'),
         "json_schema", ["if", "then"]),
        (StructuredOutput(json_schema='{"type": "string", "format": "colour"}'), "json_schema", ["colour"]),
        (StructuredOutput(json_schema='{"type": "strnig"}'), "json_schema", ["strnig"]),
        (StructuredOutput(json_schema="[1, 2]"), "json_schema", ["JSON object"]),
        (StructuredOutput(regex="(unclosed"), "regex", ["unclosed"]),
        (StructuredOutput(grammar="start: undefined_rule"), "grammar", ["undefined_rule"]),
        (StructuredOutput(grammar="root ::= ("), "grammar", []),
        (StructuredOutput(tagged_json=TaggedJSON("<a>", '{"not": {}, "type": "object"}', "</a>")), "tagged_json",
         ["not"]),
        (StructuredOutput(tagged_json=TaggedJSON("<a>", "{}", "</a>", min_items=3, max_items=1)), "tagged_json",
         ["max_items"]),
    ],
)
def test_what_cannot_be_compiled_names_the_field_and_why(
    so: StructuredOutput, field: str, words: list[str], compiler: GrammarCompiler
) -> None:
    with pytest.raises(ValueError) as info:
        compiler.compile(so)
    message, got_field = info.value.args
    assert got_field == field
    assert all(w in message for w in words), message
    assert "\n" not in message


def test_hostile_schemas_are_refused_by_the_resource_limits(compiler: GrammarCompiler) -> None:
    deep: dict[str, Any] = {"type": "integer"}
    for _ in range(300):
        deep = {"type": "object", "properties": {"x": deep}, "required": ["x"]}
    # Each is refused by a limit (nesting, lexer fuel, grammar depth), not compiled for minutes;
    # how long a refusal takes is a benchmark's business (docs/benchmarks.md, "Grammar libraries").
    with pytest.raises(ValueError, match="json_schema"):
        compiler.compile(StructuredOutput(json_schema=json.dumps(deep)))
    huge_enum = {"enum": [f"value-{i}-{(i * 7919) % 100003}" for i in range(100000)]}
    with pytest.raises(ValueError, match="too complex"):  # the lexer's fuel runs out
        compiler.compile(StructuredOutput(json_schema=json.dumps(huge_enum)))
    with pytest.raises(ValueError, match="too deeply nested"):
        compiler.compile(StructuredOutput(grammar="start: " + "(" * 5000 + '"a"' + ")" * 5000))


async def test_compile_async_runs_off_the_event_loop(compiler: GrammarCompiler, tiny_tokenizer: Any) -> None:
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(tick())
    schema = {"type": "object", "properties": {f"p{i}": {"enum": [f"v{i}_{j}" for j in range(300)]} for i in range(30)}}
    so = StructuredOutput(json_schema=json.dumps(schema))
    compiled = await compiler.compile_async(so)
    ticker.cancel()
    assert ticks > 0  # the loop ran while the compile did
    assert await compiler.compile_async(so) is compiled  # cached
    m = GrammarMatcher(compiled, compiler.tokenizer)
    assert walk(m, compiler.tokenizer, encode(tiny_tokenizer, '{"p0": "v0_12"')) is None


async def test_compile_async_gives_up_after_its_timeout(compiler: GrammarCompiler) -> None:
    schema = {"type": "object", "properties": {f"q{i}": {"type": "string", "pattern": f"^[a-z]{{{i},{i + 40}}}$"}
                                               for i in range(200)}}
    with pytest.raises(ValueError, match="took longer than") as info:
        await compiler.compile_async(StructuredOutput(json_schema=json.dumps(schema)), timeout_s=1e-4)
    assert info.value.args[1] == "json_schema"
    compiler.close()
