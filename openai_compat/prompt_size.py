"""A prompt too long for the context, known from its length in characters, before tokenizing it.

Tokenizing a 10 MB text holds the server's one tokenizer thread for seconds, and every other
request waits behind it, only for the prompt to be refused for the context length. But no
token of a tokenizer stands for more than L characters of the text it was encoded from (L is
its longest token, measured once at start-up: `PromptBound.of`), so a text of N characters is
at least ceil(N / L) tokens, and when even that does not fit the context the request gets the
context-length 400 at once (`check_prompt_text`), saying "at least".

The bound is used only where the tokenizer's structure makes it hold (below); for any other
tokenizer there is none and every prompt is tokenized, as before. It is loose (L is 81 for the
default model, whose longest token is a newline and 80 spaces), so it only ever catches prompts
far too long, never one near the limit.

Why ceil(N / L) tokens at least, for a text of N characters (Python str characters, code
points, as the Rust tokenizer sees them):

- The text is first split at added (special) tokens, each matched literally: such a
  token stands for exactly len(content) characters. One with lstrip/rstrip would swallow
  any amount of whitespace: not vouched for.
- The normalizer may only lengthen the text (Prepend, Lowercase, a Replace by something
  no shorter) and the pre-tokenizer only split it: every character is still there, in
  some piece. Normalizers that drop or merge characters (Strip, NFC, BERT's cleaning,
  SentencePiece's whitespace folding) and pre-tokenizers that drop them (Whitespace,
  BERT's, Split with Removed) are not vouched for.
- BPE then covers each piece with tokens, without gaps when every character is in the
  vocabulary (byte-level: all 256 byte characters; otherwise byte fallback with all 256
  `<0xXX>` tokens) or when each unknown one becomes an unknown token of its own (not
  fused). A byte-level vocabulary missing some bytes drops them: the characters
  beginning with such a byte are left out of N (`dropped_first_bytes`). Now each
  character counted is covered by a token, and summing over the tokens,
  N <= sum of (characters each token stands for) <= (number of tokens) * L.
- What a token stands for: for BPE on characters, the characters of its piece of text,
  at most len(token string) (a continuing-subword prefix, `<0xXX>` and the unknown token
  stand for fewer characters than their strings have: L only gets larger, the bound
  weaker). For byte-level BPE a token is a run of UTF-8 bytes, not necessarily whole
  characters: count each character of the text at its first byte, so a token stands for
  as many characters as it holds first bytes (ASCII or lead bytes, not continuation
  bytes). Its bytes decoded alone, each invalid or cut-off sequence replaced by one
  U+FFFD (Python's errors="replace"; `tokenizer.decode([id])` gives the same), give at
  least one character per first byte: the whole character, or a U+FFFD for one cut off
  at the token's end; stray continuation bytes at its start add more U+FFFD. A 3-byte
  character split over two tokens counts once in the text but decodes to a U+FFFD in
  each token. So characters of the decoded token are what L measures, and the bound
  stays valid. (Raw token strings, one character per byte, would also do, but are
  looser: a CJK character is one character of text, three of the token string.)
- Tokens added on top (BOS from add_special_tokens, the chat template's markers) only
  make the count larger.

transformers' fast tokenizers hand the text to this Rust tokenizer unchanged; a
tokenizer without one (a slow, Python tokenizer) is not vouched for.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine import PromptTooLongError

logger = logging.getLogger(__name__)

# Normalizers whose output is never shorter (in characters) than their input.
_LENGTHENING_NORMALIZERS = frozenset({"Prepend", "Lowercase", "ByteLevel"})
# Pre-tokenizers that only split (or map one character onto one, as Metaspace does with spaces).
_SPLITTING_PRE_TOKENIZERS = frozenset({"ByteLevel", "Metaspace", "Digits", "UnicodeScripts"})
# Bytes that begin a character in UTF-8 (ASCII and lead bytes; C0, C1 and F5..FF never occur).
_FIRST_BYTES = [*range(0x80), *range(0xC2, 0xF5)]


class PromptAtLeastTooLongError(PromptTooLongError):
    """A prompt too long for the context, counted before tokenizing: `num_prompt_tokens` is a
    lower bound of its length in tokens, not the length."""

    def describe(self, prompt_name: str) -> str:
        return (
            f"This model's maximum context length is {self.max_model_len} tokens. However, you requested at least "
            f"{self.num_prompt_tokens + self.num_requested_tokens} tokens (at least {self.num_prompt_tokens} in the "
            f"{prompt_name}, {self.num_requested_tokens} in the completion). Please reduce the length of the "
            f"{prompt_name} or completion."
        )


@dataclass(frozen=True)
class PromptBound:
    """The fewest tokens a text can encode to, from its length (the module docstring says why)."""

    max_chars_per_token: int  # L
    # Byte-level tokenizers whose vocabulary lacks some bytes drop the characters starting with
    # them (the default model drops "\x04", for one): these do not count towards the bound.
    dropped_first_bytes: bytes = b""

    def min_tokens(self, text: str, exact_from: int = 0) -> int:
        """A lower bound of the tokens `text` encodes to. Characters that may be dropped are
        counted only when the quick bound (O(1)) reaches `exact_from`, i.e. for a prompt about to
        be refused: that takes one pass over the text's bytes, far less than tokenizing it
        (docs/benchmarks.md, "Figures behind choices in the code")."""
        at_least = -(-len(text) // self.max_chars_per_token)
        if at_least < exact_from or not self.dropped_first_bytes:
            return at_least
        encoded = text.encode("utf-8")  # request text holds no lone surrogates: the JSON parser refuses them
        dropped = len(encoded) - len(encoded.translate(None, self.dropped_first_bytes))
        return -(-(len(text) - dropped) // self.max_chars_per_token)

    @classmethod
    def of(cls, tokenizer: Any) -> PromptBound | None:
        """The bound for `tokenizer`, or None when its structure does not vouch for one (then no
        prompt is refused before tokenizing); the module docstring says when and why it holds.
        Run once, at start-up: it measures every token of the vocabulary."""
        spec = _vouched_spec(tokenizer)
        if spec is None:
            return None
        return cls(*_longest_token(spec))


def check_prompt_text(text: str, bound: PromptBound | None, max_model_len: int, max_tokens: int | None) -> None:
    """Raise `PromptAtLeastTooLongError` when `text` can only tokenize to a prompt that the
    engine refuses for the context length. The rule is the engine's (`EngineCore.validate`), with
    the lower bound in place of the count: only prompts the engine certainly refuses are refused.
    """
    if bound is None:
        return
    # The fewest prompt tokens the engine refuses; an empty prompt gets its own 400 there.
    refused_from = max(1, max_model_len if max_tokens is None else max_model_len - max_tokens + 1)
    at_least = bound.min_tokens(text, exact_from=refused_from)
    if at_least >= refused_from:
        raise PromptAtLeastTooLongError(max_model_len, at_least, 1 if max_tokens is None else max_tokens)


def _vouched_spec(tokenizer: Any) -> dict[str, Any] | None:
    """The fast tokenizer's description (its tokenizer.json), or None, logged, when the bound
    does not hold for it."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        logger.info("prompts are always tokenized before their context-length check: no fast tokenizer")
        return None
    spec: dict[str, Any] = json.loads(backend.to_str())
    reason = _why_not(spec)
    if reason is not None:
        logger.info("prompts are always tokenized before their context-length check: %s", reason)
        return None
    return spec


def _longest_token(spec: dict[str, Any]) -> tuple[int, bytes]:
    """L, the most characters of text a token stands for, and the first bytes of the characters
    a byte-level vocabulary lacks (dropped from the text)."""
    model = spec["model"]
    vocab: dict[str, int] = model["vocab"]
    dropped = b""
    if _byte_level(spec):
        byte_of = _byte_decoder()
        chars: Callable[[str], int] = _decoded_chars(byte_of)
        if not _unknown_per_character(model):
            dropped = bytes(b for c, b in byte_of.items() if c not in vocab and b in _FIRST_BYTES)
    else:
        chars = len
    longest = max((chars(token) for token in vocab), default=1)
    for added in spec.get("added_tokens", []):
        longest = max(longest, len(added["content"]))
    return max(longest, 1), dropped


def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's bytes_to_unicode), reversed: character -> byte."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    byte_of = {chr(b): b for b in kept}
    moved = [b for b in range(256) if b not in kept]
    byte_of.update({chr(256 + i): b for i, b in enumerate(moved)})
    return byte_of


def _decoded_chars(byte_of: dict[str, int]) -> Callable[[str], int]:
    """Characters of a byte-level token decoded alone (cut-off sequences as U+FFFD)."""

    def chars(token: str) -> int:
        if all(c in byte_of for c in token):
            return len(bytes(byte_of[c] for c in token).decode("utf-8", errors="replace"))
        return len(token)  # not byte-level text: only ever the unknown token

    return chars


def _components(spec: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    if spec is None:
        return []
    if spec.get("type") == "Sequence":
        return [part for child in spec.get(key, []) for part in _components(child, key)]
    return [spec]


def _byte_level(spec: dict[str, Any]) -> bool:
    return any(part.get("type") == "ByteLevel" for part in _components(spec.get("pre_tokenizer"), "pretokenizers"))


def _unknown_per_character(model: dict[str, Any]) -> bool:
    unk = model.get("unk_token")
    return unk is not None and unk in model.get("vocab", {}) and not model.get("fuse_unk")


def _why_not(spec: dict[str, Any]) -> str | None:
    """Why the characters-per-token bound may not hold for this tokenizer; None when it holds."""
    for part in _components(spec.get("normalizer"), "normalizers"):
        kind = part.get("type")
        if kind == "Replace":
            pattern = part.get("pattern", {})
            if "String" not in pattern or len(part.get("content", "")) < len(pattern["String"]):
                return "its normalizer may shorten the text (Replace)"
        elif kind not in _LENGTHENING_NORMALIZERS:
            return f"its normalizer may shorten the text ({kind})"
    for part in _components(spec.get("pre_tokenizer"), "pretokenizers"):
        kind = part.get("type")
        if kind in ("Split", "Punctuation"):
            if part.get("behavior") == "Removed":
                return f"its pre-tokenizer drops characters ({kind}, Removed)"
        elif kind not in _SPLITTING_PRE_TOKENIZERS:
            return f"its pre-tokenizer may drop characters ({kind})"
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        return f"its model is {model.get('type')}, not BPE"
    if not _byte_level(spec) and not _unknown_per_character(model):
        vocab = model.get("vocab", {})
        if not (model.get("byte_fallback") and all(f"<0x{b:02X}>" in vocab for b in range(256))):
            return "a character outside its vocabulary may be dropped, or many may become one unknown token"
    for added in spec.get("added_tokens", []):
        if added.get("lstrip") or added.get("rstrip"):
            return f"its added token {added.get('content')!r} swallows the whitespace around it"
    return None
