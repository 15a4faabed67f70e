"""Token ids → clean text deltas, stop strings, and per-token text for logprobs.

`IncrementalDetokenizer` decodes a bounded window of ids: the tokens since the last emitted
boundary plus a few before it as context (the prefix), so that tokenizers which drop or add
a leading space at the start of a decode still produce the right delta. The delta is the
window's text minus the prefix's text and what was already returned. A trailing U+FFFD (a
multi-byte character split across tokens) is held back until a later token completes it;
at a clean end the window slides forward, so each token costs two short decodes.

`StopStringMatcher` sits after it: it holds back any tail that could still grow into a stop
string, so a stop string split over several tokens is never shown to the client.
"""

from __future__ import annotations

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
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self._special_ids: frozenset[int] = (
            frozenset(tokenizer.all_special_ids) if skip_special_tokens else frozenset()
        )
        # A fast tokenizer that cleans up no spaces decodes as its Rust backend does: call the
        # backend directly (a fifth of the cost of `tokenizer.decode`, twice per token).
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
