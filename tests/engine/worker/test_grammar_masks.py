"""GrammarMasks, the worker's side of constrained decoding, with the default model's tokenizer: each
step's masks are those of matchers that took every token its row sampled, one by one."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from engine.grammar import GrammarCompiler, GrammarMatcher, GrammarTokenizer
from engine.grammar.bitmask import unpack_bitmask
from engine.sampling_params import SamplingParams
from engine.structured_output import StructuredOutput
from engine.worker.grammar_masks import GrammarMasks
from engine.worker.sampling_state import SamplingState

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
DOCUMENT = '{"name": "Ada Lovelace", "age": 36}'


@pytest.fixture(scope="module")
def grammar_tokenizer(tiny_tokenizer: Any) -> GrammarTokenizer:
    return GrammarTokenizer(tiny_tokenizer, eos_token_ids=[tiny_tokenizer.eos_token_id])


def _allowed(matcher: GrammarMatcher, gt: GrammarTokenizer) -> torch.Tensor:
    bitmask = torch.zeros(1, gt.bitmask_words, dtype=torch.int32)
    matcher.fill_bitmask(bitmask, 0)
    return unpack_bitmask(bitmask, gt.vocab_size)[0]


def test_each_step_masks_rows_as_matchers_that_took_their_tokens_one_by_one(
    grammar_tokenizer: GrammarTokenizer, tiny_tokenizer: Any
) -> None:
    """Rows 0 and 1 write the document; row 2 is handed a token its mask refused (sampled
    behind a stop id, as a step launched ahead may): from then on only the end, its grammar's
    state untouched; row 1 sits out step 3's masks but gets its token: taken on its own."""
    gt, eos = grammar_tokenizer, tiny_tokenizer.eos_token_id
    masks = GrammarMasks("cpu", num_threads=2)
    masks.start(lambda: GrammarCompiler(gt))
    so = StructuredOutput(json_schema=json.dumps(SCHEMA))
    ids = list(tiny_tokenizer(DOCUMENT, add_special_tokens=False)["input_ids"])
    states = [SamplingState(SamplingParams(structured_output=so), [0]) for _ in range(3)]
    for state in states:
        state.compiled_grammar = masks.compile(so)
    unconstrained = SamplingState(SamplingParams(), [0])
    reference = [GrammarMatcher(masks.compile(so).result(), gt) for _ in states]
    refused = ids[1] + 1 if ids[1] + 1 != ids[2] else ids[1] + 2  # not a document token here
    for step in range(len(ids)):
        sampled = [states[0], unconstrained, states[2]] if step == 3 else [states[0], unconstrained, *states[1:]]
        mask = masks.fill(sampled)
        assert mask is not None
        constrained = [s for s in sampled if s.compiled_grammar is not None]
        assert mask.rows.tolist() == [i for i, s in enumerate(sampled) if s.compiled_grammar is not None]
        bits = unpack_bitmask(mask.bitmask, gt.vocab_size)
        for k, state in enumerate(constrained):
            expected = _allowed(reference[states.index(state)], gt)
            assert torch.equal(bits[k], expected), (step, states.index(state))
        if step == 1:
            assert not bits[constrained.index(states[2])][refused]
        for i, state in enumerate(states):
            token = refused if (i == 2 and step == 1) else ids[step]
            if state in sampled or i == 1:  # (row 1's token of step 3 waits with step 4's)
                state.append(token)
                reference[i].accept(token)
    row2 = states[2].grammar
    assert row2 is not None and row2.num_tokens == 1
    assert _allowed(row2, gt).nonzero().flatten().tolist() == [eos]
    row2.rollback(0)  # the refused token never reached the grammar's state
    expected = GrammarMatcher(masks.compile(so).result(), gt)
    assert expected.accept(ids[0]) and torch.equal(_allowed(row2, gt), _allowed(expected, gt))
    for state in states[:2]:
        matcher = state.grammar_matcher(gt)
        assert matcher.num_tokens == len(ids) and matcher.is_accepting
