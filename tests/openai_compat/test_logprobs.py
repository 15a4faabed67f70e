"""The engine's logprobs in OpenAI's chat and completions shapes."""

from __future__ import annotations

from engine import Logprob
from openai_compat.logprobs import CompletionLogprobsBuilder, chat_logprobs, token_bytes

POSITION = {7: Logprob(-0.5, 2, "b"), 3: Logprob(-0.1, 1, "a"), 9: Logprob(float("-inf"), 3, "c")}


def test_chat_shape() -> None:
    (entry,) = chat_logprobs(None, [7], [POSITION], top_k=2)
    assert entry.token == "b" and entry.logprob == -0.5 and entry.bytes == [98]
    assert [(t.token, t.logprob) for t in entry.top_logprobs] == [("a", -0.1), ("b", -0.5)]
    (entry,) = chat_logprobs(None, [9], [POSITION], top_k=0)
    assert entry.logprob == -9999.0 and entry.top_logprobs == []  # JSON has no -inf


def test_partial_characters_keep_their_bytes() -> None:
    assert token_bytes("bytes:\\xe4\\xb8") == [0xE4, 0xB8]
    assert token_bytes("é") == [0xC3, 0xA9]


def test_completions_shape_with_offsets() -> None:
    builder = CompletionLogprobsBuilder(None, top_k=1)
    out = builder.add([3, 7], [None, POSITION])
    assert out.tokens == ["token_id:3", "b"] and out.token_logprobs == [None, -0.5]
    assert out.text_offset == [0, len("token_id:3")]
    assert out.top_logprobs == [None, {"a": -0.1, "b": -0.5}]  # the top k, plus the sampled token
    more = builder.add([3], [POSITION])
    assert more.text_offset == [len("token_id:3") + 1]  # offsets run on across chunks
