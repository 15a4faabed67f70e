"""GrammarMatcher with the default model's real tokenizer: masks, stop ids, rollback, replay."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
import torch

from engine.grammar import (
    GrammarCompiler,
    GrammarMatcher,
    GrammarTokenizer,
    accept_allowed,
    apply_token_bitmask,
    fill_bitmasks,
)
from engine.grammar.bitmask import allocate_token_bitmask, unpack_bitmask
from engine.structured_output import StructuredOutput
from tests.engine.grammar.walk import allowed, encode, walk

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "vip": {"type": "boolean"},
    },
    "required": ["name", "age", "address"],
    "additionalProperties": False,
}
DOCUMENT = {"name": "Ada", "age": 36, "tags": ["a", "c"], "address": {"city": "London", "zip": "12345"}, "vip": True}


def _matcher(compiler: GrammarCompiler, gt: GrammarTokenizer, stop_token_ids: tuple[int, ...] = (), **kw: Any) -> GrammarMatcher:
    return GrammarMatcher(compiler.compile(StructuredOutput(**kw)), gt, stop_token_ids)


def test_a_json_document_passes_and_eos_comes_exactly_at_its_end(
    compiler: GrammarCompiler, grammar_tokenizer: GrammarTokenizer, tiny_tokenizer: Any
) -> None:
    gt, eos = grammar_tokenizer, tiny_tokenizer.eos_token_id
    m = _matcher(compiler, gt, json_schema=json.dumps(SCHEMA))
    ids = encode(tiny_tokenizer, json.dumps(DOCUMENT))
    for token_id in ids:
        mask = allowed(m, gt)
        assert mask[token_id] and not mask[eos]  # incomplete: no end yet
        assert not mask[49152:].any()  # the padded ids past the tokenizer's never
        assert m.accept(token_id)
    mask = allowed(m, gt)
    assert m.is_accepting and mask[eos] and mask.sum() == 1  # the object is closed: only the end
    assert not m.is_terminated and m.accept(eos) and m.is_terminated


def test_the_mask_keeps_the_output_inside_the_schema(
    compiler: GrammarCompiler, grammar_tokenizer: GrammarTokenizer, tiny_tokenizer: Any
) -> None:
    """Random logits, masked and then the best token taken, as a sampler would: the text at the
    end always parses and validates against the schema."""
    gt, eos = grammar_tokenizer, tiny_tokenizer.eos_token_id
    compiled = compiler.compile(StructuredOutput(json_schema=json.dumps(SCHEMA)))
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        m = GrammarMatcher(compiled, gt)
        out: list[int] = []
        bitmask = allocate_token_bitmask(1, gt.vocab_size)
        while not m.is_terminated:
            assert len(out) < 400, tiny_tokenizer.decode(out)
            m.fill_bitmask(bitmask, 0)
            logits = torch.randn(1, gt.vocab_size, generator=gen)
            logits[0, eos] -= 4.0  # not straight to the end: let optional fields come
            apply_token_bitmask(logits, bitmask)
            token_id = int(logits.argmax())
            assert m.accept(token_id)
            out.append(token_id)
        assert out[-1] == eos
        jsonschema.validate(json.loads(tiny_tokenizer.decode(out[:-1])), SCHEMA)


@pytest.mark.parametrize(
    ("kw", "good", "bad"),
    [
        ({"regex": r"[0-9]{3}-[a-z]+"}, "123-abc", "12a"),
        ({"choice": ("yes", "no way")}, "no way", "nope"),
        ({"grammar": 'root ::= "a" root | "b"'}, "aab", "aac"),  # GBNF
        ({"grammar": 'start: "(" NUM ("," NUM)* ")"\nNUM: /[0-9]+/'}, "(1,22,3)", "(1;2)"),  # Lark
        ({"json_object": True}, '{"x": [1, {"y": null}]}', "[1]"),
    ],
)
def test_regex_choice_grammar_and_json_object(
    kw: dict[str, Any], good: str, bad: str, compiler: GrammarCompiler, grammar_tokenizer: GrammarTokenizer,
    tiny_tokenizer: Any,
) -> None:
    gt = grammar_tokenizer
    m = _matcher(compiler, gt, **kw)
    assert walk(m, gt, encode(tiny_tokenizer, good)) is None
    assert m.is_accepting and allowed(m, gt)[tiny_tokenizer.eos_token_id]
    assert walk(_matcher(compiler, gt, **kw), gt, encode(tiny_tokenizer, bad)) is not None


def test_a_refused_token_changes_nothing_then_only_stops_are_allowed(
    compiler: GrammarCompiler, grammar_tokenizer: GrammarTokenizer, tiny_tokenizer: Any
) -> None:
    gt, eos = grammar_tokenizer, tiny_tokenizer.eos_token_id
    m = _matcher(compiler, gt, choice=("alpha", "beta"))
    assert not m.accept(eos)  # nothing generated yet: not complete
    assert m.num_tokens == 0
    assert allowed(m, gt).nonzero().flatten().tolist() == [eos]  # the sequence can only end now
    m.rollback(0)  # clears the refusal: the grammar's own state was never touched
    assert walk(m, gt, encode(tiny_tokenizer, "beta")) is None


def test_rollback_and_replay_give_back_the_same_masks(
    compiler: GrammarCompiler, grammar_tokenizer: GrammarTokenizer, tiny_tokenizer: Any
) -> None:
    gt, eos = grammar_tokenizer, tiny_tokenizer.eos_token_id
    ids = encode(tiny_tokenizer, json.dumps(DOCUMENT))
    m = _matcher(compiler, gt, json_schema=json.dumps(SCHEMA))
    assert m.accept_tokens(ids[:10])
    at_10 = allowed(m, gt)
    assert m.accept_tokens([*ids[10:], eos]) and m.is_terminated
    m.rollback(len(ids) - 10 + 1)  # the end too
    assert m.num_tokens == 10 and not m.is_terminated and torch.equal(allowed(m, gt), at_10)
    with pytest.raises(ValueError, match="roll back"):
        m.rollback(11)
    # A preempted sequence comes back with its output tokens: a new matcher replays them.
    again = _matcher(compiler, gt, json_schema=json.dumps(SCHEMA))
    assert again.replay(ids[:10]) and torch.equal(allowed(again, gt), at_10)
    m.reset()
    assert m.num_tokens == 0 and walk(m, gt, ids) is None


def test_each_choice_has_its_own_state(
    compiler: GrammarCompiler, grammar_tokenizer: GrammarTokenizer, tiny_tokenizer: Any
) -> None:
    """n > 1: matchers of one compiled grammar advance independently."""
    gt = grammar_tokenizer
    compiled = compiler.compile(StructuredOutput(choice=("cat", "dog")))
    first, second = GrammarMatcher(compiled, gt), GrammarMatcher(compiled, gt)
    fresh = allowed(second, gt)
    assert first.accept_tokens(encode(tiny_tokenizer, "dog"))
    assert torch.equal(allowed(second, gt), fresh)
    assert walk(second, gt, encode(tiny_tokenizer, "cat")) is None


def test_request_stop_ids_are_allowed_exactly_when_complete(
    compiler: GrammarCompiler, grammar_tokenizer: GrammarTokenizer, tiny_tokenizer: Any
) -> None:
    gt, stop = grammar_tokenizer, encode(tiny_tokenizer, "!")[0]
    m = _matcher(compiler, gt, (stop,), regex="[a-z]{2,3}")
    assert m.accept_tokens(encode(tiny_tokenizer, "a")) and not allowed(m, gt)[stop]
    assert m.accept_tokens(encode(tiny_tokenizer, "b"))
    assert allowed(m, gt)[stop] and m.accept(stop) and m.is_terminated
    m.rollback(1)
    assert not m.is_terminated and m.accept_tokens(encode(tiny_tokenizer, "c"))


def test_start_after_leaves_the_text_free_until_the_marker(
    compiler: GrammarCompiler, grammar_tokenizer: GrammarTokenizer, tiny_tokenizer: Any
) -> None:
    gt, eos = grammar_tokenizer, tiny_tokenizer.eos_token_id
    so = {"json_schema": json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}),
          "start_after": "</think>"}
    m = _matcher(compiler, gt, **so)
    thinking = "Let me think: {not json} here is </thin and more...\n"
    assert walk(m, gt, encode(tiny_tokenizer, thinking)) is None
    mask = allowed(m, gt)
    assert not mask[eos] and mask.sum() > 40000  # free text, but no end before the marker
    assert walk(m, gt, encode(tiny_tokenizer, "</think>\n\n")) is None
    assert not allowed(m, gt)[encode(tiny_tokenizer, "x")[0]]  # constrained from here on
    assert walk(m, gt, encode(tiny_tokenizer, '{"a": 7}')) is None
    assert allowed(m, gt)[eos]


def test_tagged_json_repeats_between_its_bounds(
    compiler: GrammarCompiler, grammar_tokenizer: GrammarTokenizer, tiny_tokenizer: Any
) -> None:
    from engine.structured_output import TaggedJSON

    gt, eos = grammar_tokenizer, tiny_tokenizer.eos_token_id
    schema = {"type": "object", "properties": {"name": {"enum": ["get_weather", "get_time"]},
              "arguments": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
              "required": ["name", "arguments"]}
    tagged = TaggedJSON(begin="<tool_call>\n", schema=json.dumps(schema), end="\n</tool_call>", separator="\n",
                        max_items=2)
    m = _matcher(compiler, gt, tagged_json=tagged)
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert walk(m, gt, encode(tiny_tokenizer, call)) is None
    assert allowed(m, gt)[eos]  # one call is enough
    assert walk(m, gt, encode(tiny_tokenizer, "\n" + call)) is None
    assert allowed(m, gt).nonzero().flatten().tolist() == [eos]  # two at most
    bad = _matcher(compiler, gt, tagged_json=tagged)
    assert walk(bad, gt, encode(tiny_tokenizer, '<tool_call>\n{"name": "get_weather", "arguments": {}}')) is not None


def test_fill_bitmasks_matches_one_by_one(
    compiler: GrammarCompiler, grammar_tokenizer: GrammarTokenizer, tiny_tokenizer: Any
) -> None:
    gt, eos = grammar_tokenizer, tiny_tokenizer.eos_token_id
    ids = encode(tiny_tokenizer, json.dumps(DOCUMENT))
    compiled = compiler.compile(StructuredOutput(json_schema=json.dumps(SCHEMA)))
    matchers = [GrammarMatcher(compiled, gt) for _ in range(5)]
    for i, m in enumerate(matchers):
        assert m.accept_tokens(ids[: 7 * i])
    done = GrammarMatcher(compiled, gt)
    assert done.accept_tokens([*ids, eos]) and done.is_terminated
    rows = [(matchers[0], 4), (done, 0), (matchers[3], 1), (matchers[1], 6), (matchers[4], 2), (matchers[2], 5)]
    batch = allocate_token_bitmask(8, gt.vocab_size)
    fill_bitmasks(rows, batch, num_threads=2)
    for m, row in rows:
        assert torch.equal(unpack_bitmask(batch[row : row + 1], gt.vocab_size)[0], allowed(m, gt))
    assert unpack_bitmask(batch[0:1], gt.vocab_size)[0].nonzero().flatten().tolist() == [eos]
    assert (batch[3] == -1).all() and (batch[7] == -1).all()  # rows not named are left alone


def test_accept_allowed_matches_accept_one_by_one(
    compiler: GrammarCompiler, grammar_tokenizer: GrammarTokenizer, tiny_tokenizer: Any
) -> None:
    """The library's threads take each matcher's token as `accept` would: the document's next
    token, the end once complete, an end too early (refused: only stops, rollback clears it), a
    token after the end; a request's own stop id."""
    gt, eos = grammar_tokenizer, tiny_tokenizer.eos_token_id
    ids = encode(tiny_tokenizer, json.dumps(DOCUMENT))
    compiled = compiler.compile(StructuredOutput(json_schema=json.dumps(SCHEMA)))
    stop = ids[0] + 1  # a request's stop id (an ordinary token otherwise)
    starts = [(0, ids[0]), (5, ids[5]), (17, ids[17]), (len(ids), eos), (3, eos), (len(ids) + 1, ids[0]), (len(ids), stop)]

    def matchers() -> list[GrammarMatcher]:
        made = [GrammarMatcher(compiled, gt, (stop,)) for _ in starts]
        for m, (n, _) in zip(made, starts, strict=True):
            assert m.accept_tokens([*ids, eos][:n])
        return made

    one_by_one, batched = matchers(), matchers()
    expected = [m.accept(token) for m, (_, token) in zip(one_by_one, starts, strict=True)]
    assert expected == [True, True, True, True, False, False, True]
    accept_allowed([(m, token) for m, (_, token) in zip(batched, starts, strict=True)], num_threads=2)
    for a, b in zip(one_by_one, batched, strict=True):
        assert (a.num_tokens, a.is_terminated, a.is_accepting) == (b.num_tokens, b.is_terminated, b.is_accepting)
        assert torch.equal(allowed(a, gt), allowed(b, gt))
    batched[4].rollback(0)  # the early end never reached the grammar
    assert walk(batched[4], gt, ids[3:]) is None and batched[4].is_accepting


def test_bitmask_must_fit_the_tokenizer(compiler: GrammarCompiler, grammar_tokenizer: GrammarTokenizer) -> None:
    m = _matcher(compiler, grammar_tokenizer, json_object=True)
    with pytest.raises(ValueError, match="int32"):
        m.fill_bitmask(allocate_token_bitmask(1, 49152), 0)  # the tokenizer's width, not the logits'
    with pytest.raises(ValueError, match="row 2"):
        m.fill_bitmask(allocate_token_bitmask(2, grammar_tokenizer.vocab_size), 2)
