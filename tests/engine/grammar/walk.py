"""Helpers of the grammar tests: a matcher's next-token set, and a text walked token by token."""

from __future__ import annotations

from typing import Any

import torch

from engine.grammar import GrammarMatcher, GrammarTokenizer, allocate_token_bitmask
from engine.grammar.bitmask import unpack_bitmask


def allowed(matcher: GrammarMatcher, gt: GrammarTokenizer) -> torch.Tensor:
    """[vocab_size] bool: the ids `matcher` allows next."""
    bitmask = allocate_token_bitmask(1, gt.vocab_size)
    bitmask.fill_(0x5A5A5A5A)  # garbage: the fill must write every word
    matcher.fill_bitmask(bitmask, 0)
    return unpack_bitmask(bitmask, gt.vocab_size)[0]


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def walk(matcher: GrammarMatcher, gt: GrammarTokenizer, token_ids: list[int]) -> int | None:
    """Offer `token_ids` one by one, each checked against the mask first; the index of the first
    one masked or refused, None when all pass."""
    for i, token_id in enumerate(token_ids):
        if not allowed(matcher, gt)[token_id] or not matcher.accept(token_id):
            return i
    return None
