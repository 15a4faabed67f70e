"""The SSE events of a stream's plain text chunks, written from a template.

A streamed response sends one chunk per token per choice, and most of them carry nothing but
text (no logprobs): `data: {"id":...,"choices":[{"index":0,"text":" the",...}]}`. Building the
pydantic model and serializing it costs many times what filling a template does (docs/benchmarks.md,
"GPU: served", run of 2026-12-02 00:45), and the event loop that streams also schedules the
engine's steps. The template is the
pydantic serialization of the response with no choices, cut where the choice goes, so every
other field is the model's own; the choice is written here, and the tests check its bytes
against the model's for every kind of text and finish reason. Chunks with logprobs, and the
last chunk with usage, still go through the models.
"""

from __future__ import annotations

import json

from pydantic import BaseModel

_json_str = json.JSONEncoder(ensure_ascii=False).encode  # as pydantic writes strings: UTF-8, not \u-escaped
_CHOICES = '"choices":[]'


class ChunkTemplate:
    """Events of one response's text-only chunks. `empty` is the response's chunk model with
    `choices=[]`, serialized as every chunk of the stream is (`exclude`)."""

    def __init__(self, empty: BaseModel, exclude: set[str] | None) -> None:
        document = empty.model_dump_json(exclude=exclude)
        head, found, tail = document.partition(_CHOICES)
        if not found or _CHOICES in tail:
            raise ValueError(f"no single empty choices list in {document!r}")
        self._head = "data: " + head + '"choices":['
        self._tail = ']' + tail + '\n\n'

    def _event(self, choice: str) -> bytes:
        return (self._head + choice + self._tail).encode("utf-8")

    def completion(self, index: int, text: str, finish_reason: str | None) -> bytes:
        """A `text_completion` chunk: the choice's text, no logprobs."""
        reason = "null" if finish_reason is None else _json_str(finish_reason)
        return self._event(f'{{"index":{index},"text":{_json_str(text)},"logprobs":null,"finish_reason":{reason}}}')

    def chat(self, index: int, content: str | None, finish_reason: str | None) -> bytes:
        """A `chat.completion.chunk`: the choice's content delta (`{}` when None), no logprobs."""
        delta = "{}" if content is None else f'{{"content":{_json_str(content)}}}'
        reason = "null" if finish_reason is None else _json_str(finish_reason)
        return self._event(f'{{"index":{index},"delta":{delta},"logprobs":null,"finish_reason":{reason}}}')
