"""Compiling a `StructuredOutput` for one tokenizer: checked, bounded, cached.

`GrammarTokenizer` is the library's view of the model's tokenizer, made once per process
(seconds for a large vocabulary): each token's bytes, the ids that end generation, and the
width of the logits (`vocab_size`, which may exceed the tokenizer's when the embedding is
padded: those ids are never allowed).

`GrammarCompiler.compile(so)` builds the grammar (`engine/grammar/lark.py`), has the library
build its parser and lexer under `LIMITS` (a hostile schema is refused with an error instead of
running for minutes: its lexer states, the work to build them and the grammar's size are
capped), and keeps the result in an LRU cache keyed by `so` itself (a frozen dataclass: the
same constraint text is one entry). `compile_async` runs it on a small thread pool of its own,
off the event loop, and gives up after `timeout_s` with a ValueError: the library drops the
GIL while it builds, and its limits make the abandoned build end soon after.

Errors are `ValueError(message, field)`, `field` one of `StructuredOutput`'s: for a JSON
schema feature the library cannot express, the message names it (`Unimplemented keys:
["uniqueItems"]`), so a client learns what to change.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.hf

from engine.grammar.lark import top_level_grammar
from engine.structured_output import StructuredOutput

# What one grammar may cost the library (its defaults, tighter where a request could otherwise
# hold a compile thread for seconds): lexer states and the fuel to build them, the grammar's
# size, Earley items per step.
LIMITS: dict[str, int] = dict(
    max_items_in_row=2000,
    initial_lexer_fuel=200_000,
    step_lexer_fuel=200_000,
    step_max_items=50_000,
    max_lexer_states=50_000,
    max_grammar_size=50_000,
)
COMPILE_TIMEOUT_S = 10.0
CACHE_SIZE = 256


def parser_limits() -> llguidance.LLParserLimits:
    # verbose_errors off: the error goes back to the client, not the parser's state
    return llguidance.LLParserLimits(
        max_items_in_row=LIMITS["max_items_in_row"],
        initial_lexer_fuel=LIMITS["initial_lexer_fuel"],
        step_lexer_fuel=LIMITS["step_lexer_fuel"],
        step_max_items=LIMITS["step_max_items"],
        max_lexer_states=LIMITS["max_lexer_states"],
        max_grammar_size=LIMITS["max_grammar_size"],
        verbose_errors=False,
    )


class GrammarTokenizer:
    """The library's tokenizer: token bytes, end-of-generation ids, mask width."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int | None = None, eos_token_ids: Iterable[int] = ()) -> None:
        eos = sorted(i for i in (set(eos_token_ids) or {hf_tokenizer.eos_token_id}) if i is not None)
        self.vocab_size = max(vocab_size or 0, len(hf_tokenizer))
        self.eos_token_ids = frozenset(eos)
        try:
            self.ll = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=self.vocab_size, eos_token=eos or None)
        except ValueError as e:  # a tokenizer without its Rust backend ("slow")
            raise ValueError(f"constrained decoding needs a fast tokenizer: {e}", "structured_output") from None
        # The text of each special token -> its id (a grammar names them, see lark.py).
        self.special_tokens = {
            t.content: i for i, t in hf_tokenizer.added_tokens_decoder.items() if getattr(t, "special", False)
        }

    @property
    def bitmask_words(self) -> int:
        """int32 words in one row of a next-token bitmask: ceil(vocab_size / 32)."""
        return (self.vocab_size + 31) // 32


@dataclass(frozen=True, slots=True)
class CompiledGrammar:
    """A checked grammar: `grammar` is the library's JSON text; `template` a matcher in its
    start state, copied for each sequence (the parser and lexer built once are shared)."""

    grammar: str
    template: Any  # llguidance.LLMatcher, never advanced


class GrammarCompiler:
    """Compiles constraints for one tokenizer, caching the last `CACHE_SIZE` distinct ones.
    Thread-safe: the event loop, its compile threads and a worker's step loop may share one."""

    def __init__(self, tokenizer: GrammarTokenizer, cache_size: int = CACHE_SIZE) -> None:
        self.tokenizer = tokenizer
        self._cache: OrderedDict[StructuredOutput, CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def compile(self, so: StructuredOutput) -> CompiledGrammar:
        """The compiled `so` (from the cache when it was compiled before). ValueError(message,
        field) when it cannot be."""
        cached = self._cached(so)
        if cached is not None:
            return cached
        grammar = top_level_grammar(so, self.tokenizer.special_tokens)
        matcher = llguidance.LLMatcher(self.tokenizer.ll, grammar, log_level=0, limits=parser_limits())
        if matcher.is_error():
            raise ValueError(_message(so.kind, matcher.get_error()), so.kind)
        compiled = CompiledGrammar(grammar, matcher)
        self._store(so, compiled)
        return compiled

    async def compile_async(self, so: StructuredOutput, timeout_s: float = COMPILE_TIMEOUT_S) -> CompiledGrammar:
        """`compile` on this compiler's threads; ValueError when it takes over `timeout_s`."""
        cached = self._cached(so)
        if cached is not None:
            return cached
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lightgate-grammar")
        future = asyncio.get_running_loop().run_in_executor(self._pool, self.compile, so)
        try:
            return await asyncio.wait_for(future, timeout_s)
        except asyncio.TimeoutError:  # (not the builtin TimeoutError before Python 3.11)
            raise ValueError(
                f"{so.kind} took longer than {timeout_s:g} s to compile: simplify it", so.kind
            ) from None

    def _cached(self, key: StructuredOutput) -> CompiledGrammar | None:
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
            return compiled

    def _store(self, key: StructuredOutput, compiled: CompiledGrammar) -> None:
        with self._lock:
            self._cache[key] = compiled
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def model_compiler(hf_tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int]) -> GrammarCompiler:
    """The compiler for a model: its tokenizer, the width of its logits, the ids that end its
    generation. The server process and each worker make one alike."""
    return GrammarCompiler(GrammarTokenizer(hf_tokenizer, vocab_size=vocab_size, eos_token_ids=eos_token_ids))


def compiler_in_background(build: Callable[[], GrammarCompiler]) -> Future[GrammarCompiler]:
    """`build()` on a daemon thread of its own (a tokenizer's set-up takes seconds for a large
    vocabulary; a daemon never holds up the process's exit)."""
    future: Future[GrammarCompiler] = Future()

    def run() -> None:
        try:
            future.set_result(build())
        except BaseException as e:  # delivered to whoever waits for it
            future.set_exception(e)

    threading.Thread(target=run, daemon=True, name="lightgate-grammar-setup").start()
    return future


def _message(field: str, error: str) -> str:
    """The library's error as a client reads it: one line, saying which constraint."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    first = " ".join(lines)[:400] if lines else "unknown error"
    if "Unimplemented keys" in first or "Unknown format" in first:
        return f"{field} uses a JSON schema feature that constrained decoding does not support: {first}"
    if "too big" in first or "limit" in first or "too complex" in first.lower():
        return f"{field} is too complex to enforce: {first}"
    return f"{field} cannot be compiled: {first}"

