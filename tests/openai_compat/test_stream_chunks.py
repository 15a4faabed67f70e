"""The text-only chunks written from a template are, byte for byte, the events the pydantic
models give: for any text (every character up to U+2FFF, control characters, quotes, escapes,
emoji, JSON that looks like the template), finish reason, index, model name and usage setting.
"""

from __future__ import annotations

import pytest

from openai_compat.protocol import (
    ChatCompletionChunk,
    ChatStreamChoice,
    CompletionChoice,
    CompletionResponse,
    DeltaMessage,
)
from openai_compat.sse import format_event
from openai_compat.stream_chunks import ChunkTemplate

TEXTS = [
    "", " the", "a\nb\tc\r\x00\x01\x1f\x7f", '"quoted" \\ back\\slash /', "é漢字🙂\u2028\u2029\ufeff",
    '"choices":[]', "}]}", "\ud7ff\ue000\uffff", "".join(map(chr, range(0x0, 0x3000))),
]
MODELS = ["llama8b", 'we"ird/mo\\del é', '"choices":[]']


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("include_usage", [False, True])
def test_completion_chunks_are_the_models_events(model: str, include_usage: bool) -> None:
    exclude = None if include_usage else {"usage"}
    empty = CompletionResponse(id="cmpl-1", created=1700000000, model=model, system_fingerprint="fp", choices=[])
    template = ChunkTemplate(empty, exclude)
    for text in TEXTS:
        for reason in (None, "stop", "length"):
            for index in (0, 7):
                want = CompletionResponse(
                    id="cmpl-1", created=1700000000, model=model, system_fingerprint="fp",
                    choices=[CompletionChoice(index=index, text=text, logprobs=None, finish_reason=reason)],
                )
                assert template.completion(index, text, reason) == format_event(want.model_dump_json(exclude=exclude))


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_chunks_are_the_models_events(model: str, include_usage: bool) -> None:
    exclude = None if include_usage else {"usage"}
    empty = ChatCompletionChunk(id="chatcmpl-1", created=1700000000, model=model, system_fingerprint="fp", choices=[])
    template = ChunkTemplate(empty, exclude)
    for content in [*TEXTS, None]:
        for reason in (None, "stop", "length"):
            for index in (0, 3):
                want = ChatCompletionChunk(
                    id="chatcmpl-1", created=1700000000, model=model, system_fingerprint="fp",
                    choices=[ChatStreamChoice(index=index, delta=DeltaMessage(content=content), finish_reason=reason)],
                )
                assert template.chat(index, content, reason) == format_event(want.model_dump_json(exclude=exclude))
