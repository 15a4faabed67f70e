"""The engine's per-token logprobs in OpenAI's two shapes.

Chat: `content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]`.
Completions: parallel lists `tokens`, `token_logprobs`, `top_logprobs` (token -> logprob),
`text_offset` (where each token starts in the choice's text, echoed prompt included).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from engine import Logprob
from openai_compat.protocol import CompletionLogprobs, TokenLogprob, TopLogprob

LogprobsDict = dict[int, Logprob]

_BYTE_ESCAPE = re.compile(r"\\x([0-9a-f]{2})")


def token_text(tokenizer: Any, token_id: int, logprob: Logprob | None) -> str:
    if logprob is not None and logprob.decoded_token is not None:
        return logprob.decoded_token
    if tokenizer is None:
        return f"token_id:{token_id}"
    return str(tokenizer.decode([token_id]))


def token_bytes(token: str) -> list[int]:
    """UTF-8 bytes of a token; a partial character arrives from the engine as "bytes:\\xe4\\xb8"."""
    if token.startswith("bytes:"):
        return [int(h, 16) for h in _BYTE_ESCAPE.findall(token)]
    return list(token.encode("utf-8"))


def _finite(logprob: float) -> float:
    """JSON has no -inf: OpenAI shows "very unlikely" as -9999.0."""
    return logprob if logprob > -9999.0 else -9999.0


def _top(entries: LogprobsDict, k: int) -> list[tuple[int, Logprob]]:
    """The k most likely alternatives at one position, most likely first."""
    if k <= 0:
        return []
    return sorted(((tid, lp) for tid, lp in entries.items() if lp.rank <= k), key=lambda item: item[1].rank)[:k]


def chat_logprobs(
    tokenizer: Any, token_ids: Sequence[int], entries: Sequence[LogprobsDict], top_k: int
) -> list[TokenLogprob]:
    content = []
    for tid, position in zip(token_ids, entries, strict=False):
        chosen = position.get(tid)
        token = token_text(tokenizer, tid, chosen)
        tops = []
        for alt_id, alt in _top(position, top_k):
            alt_token = token_text(tokenizer, alt_id, alt)
            tops.append(TopLogprob(token=alt_token, logprob=_finite(alt.logprob), bytes=token_bytes(alt_token)))
        content.append(
            TokenLogprob(
                token=token,
                logprob=_finite(chosen.logprob) if chosen is not None else -9999.0,
                bytes=token_bytes(token),
                top_logprobs=tops,
            )
        )
    return content


class CompletionLogprobsBuilder:
    """Builds one choice's completions logprobs chunk by chunk; keeps the running text offset."""

    def __init__(self, tokenizer: Any, top_k: int) -> None:
        self.tokenizer = tokenizer
        self.top_k = top_k
        self.offset = 0

    def add(
        self, token_ids: Sequence[int], entries: Sequence[LogprobsDict | None], out: CompletionLogprobs | None = None
    ) -> CompletionLogprobs:
        """Append to `out` (or a new chunk); `entries[i]` None: no logprob there (a prompt's first token)."""
        out = out if out is not None else CompletionLogprobs()
        for tid, position in zip(token_ids, entries, strict=False):
            chosen = position.get(tid) if position is not None else None
            token = token_text(self.tokenizer, tid, chosen)
            out.tokens.append(token)
            out.text_offset.append(self.offset)
            self.offset += len(token)
            out.token_logprobs.append(_finite(chosen.logprob) if chosen is not None else None)
            if position is None:
                out.top_logprobs.append(None)
                continue
            tops = {token_text(self.tokenizer, a, lp): _finite(lp.logprob) for a, lp in _top(position, self.top_k)}
            if chosen is not None:
                tops.setdefault(token, _finite(chosen.logprob))  # OpenAI lists the sampled token too
            out.top_logprobs.append(tops)
        return out
