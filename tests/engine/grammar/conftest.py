"""The default model's real tokenizer as the grammar library sees it, built once per session."""

from __future__ import annotations

from typing import Any

import pytest

from engine.grammar import GrammarCompiler, GrammarTokenizer

# Logits wider than the tokenizer (49 152 tokens): a padded embedding, as the 8B-shaped test
# model's 128 256 columns over the same tokenizer.
PADDED_VOCAB = 49152 + 70


@pytest.fixture(scope="session")
def grammar_tokenizer(tiny_tokenizer: Any) -> GrammarTokenizer:
    return GrammarTokenizer(tiny_tokenizer, vocab_size=PADDED_VOCAB, eos_token_ids=[tiny_tokenizer.eos_token_id])


@pytest.fixture
def compiler(grammar_tokenizer: GrammarTokenizer) -> GrammarCompiler:
    return GrammarCompiler(grammar_tokenizer)
