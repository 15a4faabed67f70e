"""Token ids → clean text deltas, stop strings, and per-token text for logprobs.

`IncrementalDetokenizer` decodes a bounded window of ids: the tokens since the last emitted
boundary plus a few before it as context (the prefix), so that tokenizers which drop or add
a leading space at the start of a decode still produce the right delta. The delta is the
window's text minus the prefix's text and what was already returned. A trailing U+FFFD (a
multi-byte character split across tokens) is held back until a later token completes it;
at a clean end the window slides forward, so each token costs two short decodes.

`ByteLevelDetokenizer` does the same work for a byte-level BPE tokenizer (GPT-2's scheme:
Llama 3, Qwen2, SmolLM2, StarCoder) without decoding: such a tokenizer's text is the UTF-8 of
its tokens' bytes joined, so each token appends its bytes (`byte_level_pieces`, one table per
tokenizer) to an incremental UTF-8 decoder, which holds back a character split across tokens.
`Detokenizers` finds once per tokenizer what they need, and picks one for each output.

`StopStringMatcher` sits after it: it holds back any tail that could still grow into a stop
string, so a stop string split over several tokens is never shown to the client.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

# Prompt tokens kept as decoding context in front of the first output token.
_NUM_CONTEXT_TOKENS = 5
# A window still ending in U+FFFD after this many tokens is taken to hold invalid bytes
# rather than a split character (at most 4 bytes); its text is then emitted as is.
_MAX_PENDING_TOKENS = 32
_REPLACEMENT = "\ufffd"
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        special_ids: frozenset[int] | None = None,  # `skipped_special_ids(tokenizer)`, if known
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        if not skip_special_tokens:
            special_ids = frozenset()
        elif special_ids is None:
            special_ids = skipped_special_ids(tokenizer)
        self._special_ids = special_ids
        # A fast tokenizer that cleans up no spaces decodes as its Rust backend does: call the
        # backend directly (a fraction of the cost of `tokenizer.decode`, which runs twice per
        # token; docs/benchmarks.md, "Figures behind choices in the code").
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = None if getattr(tokenizer, "clean_up_tokenization_spaces", False) else backend
        context = [t for t in prompt_token_ids if t not in self._special_ids][-_NUM_CONTEXT_TOKENS:]
        # A prompt ending in part of a character must not lend its bytes to the output.
        while context and self._decode(context).endswith(_REPLACEMENT):
            context.pop()
        # _window[:_read_idx] was already emitted (or is prompt context): the prefix.
        self._window: list[int] = context
        self._read_idx = len(context)
        self._prefix_len = len(self._decode(context))
        self._num_emitted = 0  # chars of the window's text past the prefix already returned
        self._parts: list[str] = []

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if self._backend is not None:
            return str(self._backend.decode(ids, skip_special_tokens=self.skip_special_tokens))
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
        )

    def add(self, token_id: int) -> str:
        """Feed one generated token; return the text it completes (possibly "")."""
        if token_id in self._special_ids:
            return ""  # decode(skip_special_tokens=True) drops it as if it were never there
        self._window.append(token_id)
        new_text = self._decode(self._window)
        if not new_text.endswith(_REPLACEMENT):
            return self._advance(new_text)
        if len(self._window) - self._read_idx >= _MAX_PENDING_TOKENS:
            return self._advance(new_text)  # invalid bytes that nothing can complete
        # Appending bytes only ever changes the trailing unfinished character (UTF-8 is
        # self-synchronising), so everything before the trailing U+FFFD run is final.
        return self._emit(new_text.rstrip(_REPLACEMENT))

    def _emit(self, stable_text: str) -> str:
        delta = stable_text[self._prefix_len + self._num_emitted :]
        self._num_emitted += len(delta)
        if delta:
            self._parts.append(delta)
        return delta

    def _advance(self, new_text: str) -> str:
        """Emit the rest of the window's text and make what was read the new prefix."""
        delta = self._emit(new_text)
        self._window = self._window[self._read_idx :]
        self._read_idx = len(self._window)
        self._prefix_len = len(self._decode(self._window))
        self._num_emitted = 0
        return delta

    def flush(self) -> str:
        """Release text held back at the end of generation (an unfinished character)."""
        if len(self._window) == self._read_idx:
            return ""
        return self._advance(self._decode(self._window))

    @property
    def text(self) -> str:
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""


class ByteLevelDetokenizer:
    """`IncrementalDetokenizer`'s results for a byte-level BPE tokenizer, from `pieces` (each
    token's bytes, `byte_level_pieces`) and the ids its decode skips; no decoding per token."""

    def __init__(self, pieces: list[bytes], skipped_ids: frozenset[int]) -> None:
        self._pieces = pieces
        self._skipped = skipped_ids
        # "replace": invalid bytes become U+FFFD, as the tokenizer's lossy decode does.
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._parts: list[str] = []

    def add(self, token_id: int) -> str:
        """Feed one generated token; return the text it completes (possibly "")."""
        if token_id in self._skipped or not 0 <= token_id < len(self._pieces):
            return ""  # an id outside the tokenizer's vocabulary decodes to nothing, too
        text = self._utf8.decode(self._pieces[token_id])
        if text:
            self._parts.append(text)
        return text

    def flush(self) -> str:
        """Release bytes held back at the end of generation (an unfinished character)."""
        text = self._utf8.decode(b"", True)
        if text:
            self._parts.append(text)
        return text

    @property
    def text(self) -> str:
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""


def byte_level_pieces(tokenizer: Any) -> list[bytes] | None:
    """Each token id's bytes, for a tokenizer that decodes a list of ids as the UTF-8 of their
    bytes joined (a fast tokenizer with a byte-level decoder and no space clean-up); None for
    any other. Checked: every token decodes alone as its bytes do."""
    from tokenizers import decoders

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (
        backend is None
        or getattr(tokenizer, "clean_up_tokenization_spaces", False)
        or not isinstance(backend.decoder, decoders.ByteLevel)
    ):
        return None
    byte_decoder = _byte_decoder()
    size = max(len(tokenizer), backend.get_vocab_size(with_added_tokens=True))
    pieces: list[bytes] = []
    for token_id in range(size):
        piece = backend.id_to_token(token_id)
        if piece is None:
            pieces.append(b"")
        elif all(ch in byte_decoder for ch in piece):
            pieces.append(bytes(byte_decoder[ch] for ch in piece))
        else:  # the decoder keeps a piece outside the byte alphabet (an added token) as its text
            pieces.append(piece.encode())
    alone = backend.decode_batch([[i] for i in range(size)], skip_special_tokens=False)
    if any(text != raw.decode("utf-8", "replace") for text, raw in zip(alone, pieces, strict=True)):
        return None
    return pieces


def skipped_special_ids(tokenizer: Any) -> frozenset[int]:
    """The ids that decoding with `skip_special_tokens` leaves out: a fast tokenizer's added
    tokens marked special (a special token of the tokenizer's map that its backend does not
    mark special, e.g. a pad token added as a plain one, is kept, as `decode` keeps it), or a
    slow tokenizer's special ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return frozenset(tokenizer.all_special_ids)
    return frozenset(i for i, added in backend.get_added_tokens_decoder().items() if added.special)


class Detokenizers:
    """The detokenizers of one tokenizer's outputs. What they need from the tokenizer (the ids
    decode skips; a byte-level tokenizer's table of token bytes) is found once, here."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.special_ids = skipped_special_ids(tokenizer)
        self.pieces = byte_level_pieces(tokenizer)

    def new(
        self, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> IncrementalDetokenizer | ByteLevelDetokenizer:
        """A detokenizer for one output: the byte-level one where the table applies."""
        if self.pieces is not None:
            return ByteLevelDetokenizer(self.pieces, self.special_ids if skip_special_tokens else frozenset())
        return IncrementalDetokenizer(
            self.tokenizer, prompt_token_ids, skip_special_tokens, spaces_between_special_tokens, self.special_ids
        )


class StopStringMatcher:
    """Cut the output at the first stop string, which may span several deltas."""

    def __init__(self, stop: list[str], include_stop_str_in_output: bool) -> None:
        self.stop = [s for s in stop if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        self._max_len = max((len(s) for s in self.stop), default=0)
        self._held = ""  # not yet emitted: could be the start of a stop string
        self._context = ""  # emitted tail kept to match across deltas (include mode only)
        self.matched: str | None = None

    def feed(self, delta: str) -> tuple[str, str | None]:
        """Return (text safe to emit now, the stop string if one completed)."""
        if self.matched is not None:
            return "", None
        if not self.stop:
            return delta, None
        text = self._context + self._held + delta
        start = len(self._context)  # text[start:] has not been emitted
        best_pos, best = -1, ""
        for s in self.stop:
            pos = text.find(s, max(0, start - len(s) + 1))
            if pos != -1 and (best_pos == -1 or pos < best_pos):
                best_pos, best = pos, s
        if best_pos != -1:
            self.matched = best
            end = best_pos + len(best) if self.include_stop_str_in_output else best_pos
            self._held = self._context = ""
            return text[start:end], best
        if self.include_stop_str_in_output:
            # Everything before a stop string's end is output anyway: emit it all now.
            self._context = text[-(self._max_len - 1) :] if self._max_len > 1 else ""
            return text[start:], None
        keep = self._partial_match_len(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], None

    def _partial_match_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        for k in range(min(len(text), self._max_len - 1), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

    def flush(self) -> str:
        """At the end of generation (length / eos), release what was held back."""
        held, self._held = self._held, ""
        return held


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of the byte-level BPE alphabet: printable stand-in character → byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def convert_ids_to_token_bytes(tokenizer: Any, ids: Sequence[int]) -> list[bytes]:
    """The raw bytes of each token: what OpenAI's `bytes` field of a logprob holds."""
    out: list[bytes] = []
    byte_decoder = _byte_decoder()
    for token_id, piece in zip(ids, tokenizer.convert_ids_to_tokens(list(ids)), strict=True):
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        if _REPLACEMENT not in text or piece is None:
            out.append(text.encode())
        elif m := _BYTE_FALLBACK.fullmatch(piece):  # SentencePiece byte fallback: <0xE4>
            out.append(bytes([int(m.group(1), 16)]))
        elif all(ch in byte_decoder for ch in piece):  # byte-level BPE piece
            out.append(bytes(byte_decoder[ch] for ch in piece))
        else:
            out.append(text.encode())
    return out


def convert_ids_to_logprob_tokens(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each token's own text, as the `token` field of OpenAI logprobs shows it.

    A token that holds only part of a UTF-8 character has no text of its own; like OpenAI,
    it is shown as its bytes, e.g. "bytes:\\xe4\\xb8".
    """
    out: list[str] = []
    for raw in convert_ids_to_token_bytes(tokenizer, ids):
        try:
            out.append(raw.decode())
        except UnicodeDecodeError:
            out.append("bytes:" + "".join(f"\\x{b:02x}" for b in raw))
    return out
