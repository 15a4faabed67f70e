"""Constrained decoding: a `StructuredOutput` compiled for the model's tokenizer, one matcher
per sequence that fills a next-token bitmask before each token and accepts the token after
it, and the bitmask applied to the logits (see docs/structures.md "Constrained decoding").

The grammar library is llguidance (why: docs/benchmarks.md "Grammar libraries").
"""

from engine.grammar.bitmask import allocate_token_bitmask, apply_token_bitmask
from engine.grammar.compiler import CompiledGrammar, GrammarCompiler, GrammarTokenizer
from engine.grammar.matcher import GrammarMatcher, accept_allowed, fill_bitmasks

__all__ = [
    "CompiledGrammar",
    "GrammarCompiler",
    "GrammarMatcher",
    "GrammarTokenizer",
    "accept_allowed",
    "allocate_token_bitmask",
    "apply_token_bitmask",
    "fill_bitmasks",
]
