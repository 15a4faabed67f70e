"""Requests too big to be worth the work: a text prompt far too long for the context is refused
from its length in characters, before the tokenizer thread spends seconds on it (on the shared
`tiny_server`, context 512); a request body over --max-request-body-bytes gets a 413 before it is
all read (`small_body_server`, a limit of 4 KiB)."""

from __future__ import annotations

import argparse
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openai_compat.config import Settings, add_cli_flags, load_settings
from openai_compat.prompt_size import PromptAtLeastTooLongError, PromptBound, check_prompt_text
from tests.openai_compat.servers import CHAT, TINY, TINY_ARGS, ProcessServer, post

TEN_MB = "hello world " * (10_000_000 // 12)
BODY_LIMIT = 4096


# -- the bound itself -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bound(tiny_tokenizer: Any) -> PromptBound:
    result = PromptBound.of(tiny_tokenizer)
    assert result is not None
    return result


def test_the_longest_token_is_the_longest_single_token_decoding(tiny_tokenizer: Any, bound: PromptBound) -> None:
    # Measured in characters of each id decoded alone (special tokens included), as the tokenizer
    # decodes it: the default model's longest token is a newline and 80 spaces.
    decoded = tiny_tokenizer.batch_decode(
        [[i] for i in range(len(tiny_tokenizer))], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    assert bound.max_chars_per_token == max(len(text) for text in decoded) == 81
    # Its byte-level vocabulary lacks some control characters, which are dropped from the text.
    assert b"\x04" in bound.dropped_first_bytes
    assert tiny_tokenizer.decode(tiny_tokenizer.encode("a\x04b", add_special_tokens=False)) == "ab"


def test_the_bound_is_reached(tiny_tokenizer: Any, bound: PromptBound) -> None:
    text = ("\n" + " " * 80) * 100
    assert len(tiny_tokenizer.encode(text, add_special_tokens=False)) == bound.min_tokens(text) == 100


PIECES = [
    " ", "  ", "\n", "\t", "a", "hello", " world", "é", "e\u0301", "世界", "🙂", "\U00050000", "\x04", "\x1d",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "\n" + " " * 80, " " * 200, "-" * 50, "\xff",
]


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(st.sampled_from(PIECES), max_size=60))
def test_no_text_encodes_to_fewer_tokens_than_the_bound(tiny_tokenizer: Any, bound: PromptBound, pieces: list[str]) -> None:
    text = "".join(pieces)
    assert len(tiny_tokenizer.encode(text, add_special_tokens=False)) >= bound.min_tokens(text)


def test_characters_the_tokenizer_drops_do_not_count(bound: PromptBound) -> None:
    text = "\x04" * 100_000 + "hi"
    assert bound.min_tokens(text) == 1  # one token of "hi" at least; "hi" alone is exactly that
    check_prompt_text(text, bound, 512, 16)  # may fit: tokenized, not refused
    assert -(-len(text) // 81) > 512  # which counting every character would have done


def test_the_refusal_rule_is_the_engines(bound: PromptBound) -> None:
    def refused(num_chars: int, max_model_len: int, max_tokens: int | None) -> bool:
        try:
            check_prompt_text("x" * num_chars, bound, max_model_len, max_tokens)
        except PromptAtLeastTooLongError as e:
            assert e.num_prompt_tokens == -(-num_chars // 81)
            return True
        return False

    # At least 10 tokens: refused when 10 + max_tokens > 100, or 10 >= 100 without max_tokens.
    assert not refused(810, 100, 90) and refused(810, 100, 91)
    assert not refused(81 * 99, 100, None) and refused(81 * 99 + 1, 100, None)
    assert not refused(0, 100, 200)  # an empty prompt gets the engine's own 400, not this one
    assert "at least 20 tokens (at least 10 in the prompt, 10 in the completion)" in str(
        PromptAtLeastTooLongError(15, 10, 10).describe("prompt")
    )


def _wrap(tokenizer: Any) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def test_tokenizers_that_may_drop_or_merge_characters_get_no_bound() -> None:
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers

    vocab = {"[UNK]": 0, "a": 1, "b": 2, " ": 3}
    whitespace = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    whitespace.pre_tokenizer = pre_tokenizers.Whitespace()
    assert PromptBound.of(_wrap(whitespace)) is None  # "a      b" is two tokens

    def bpe() -> Tokenizer:
        return Tokenizer(models.BPE(vocab, [], unk_token="[UNK]"))

    assert PromptBound.of(_wrap(bpe())) is not None  # each unknown character its own [UNK]
    fused = Tokenizer(models.BPE(vocab, [], unk_token="[UNK]", fuse_unk=True))
    assert PromptBound.of(_wrap(fused)) is None
    nfc = bpe()
    nfc.normalizer = normalizers.NFC()  # "e" + U+0301 -> "é"
    assert PromptBound.of(_wrap(nfc)) is None
    strip = bpe()
    strip.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Strip()])
    assert PromptBound.of(_wrap(strip)) is None
    swallowing = bpe()
    swallowing.add_special_tokens([AddedToken("<mask>", lstrip=True)])
    assert PromptBound.of(_wrap(swallowing)) is None
    spaces = bpe()
    spaces.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    spaces.add_special_tokens(["<|a-long-special-token|>"])
    assert PromptBound.of(_wrap(spaces)) == PromptBound(len("<|a-long-special-token|>"))


# -- on the server ----------------------------------------------------------------------------


def test_a_huge_completion_prompt_is_refused_without_tokenizing_it(tiny_server: ProcessServer) -> None:
    for prompt in [TEN_MB, ["hi", TEN_MB]]:
        r = post(tiny_server.url, "/v1/completions", {"model": TINY, "prompt": prompt, "max_tokens": 2})
        error = r.json()["error"]
        assert r.status_code == 400 and error["code"] == "context_length_exceeded" and error["param"] == "prompt"
        # "at least": counted from its characters; the tokenizer's exact count never says that.
        assert "maximum context length is 512 tokens" in error["message"], error
        assert "at least 123457 in the prompt, 2 in the completion" in error["message"], error


def test_a_huge_chat_message_is_refused_without_tokenizing_it(tiny_server: ProcessServer) -> None:
    for max_tokens in [None, 3]:
        messages = [{"role": "user", "content": TEN_MB}]
        r = post(tiny_server.url, "/v1/chat/completions", {"model": TINY, "messages": messages, "max_tokens": max_tokens})
        error = r.json()["error"]
        assert r.status_code == 400 and error["code"] == "context_length_exceeded" and error["param"] == "messages"
        assert f"{max_tokens or 1} in the completion" in error["message"] and "at least" in error["message"], error
        assert "in the messages" in error["message"]


def test_prompts_near_the_limit_are_still_counted_exactly(tiny_server: ProcessServer) -> None:
    url = tiny_server.url
    r = post(url, "/v1/completions", {"model": TINY, "prompt": " hello" * 600, "max_tokens": 2})
    error = r.json()["error"]
    assert r.status_code == 400 and error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert "at least" not in error["message"] and "600 in the prompt" in error["message"], error
    # Characters the tokenizer drops: too long by its length, but only one token.
    r = post(url, "/v1/completions", {"model": TINY, "prompt": "\x04" * 100_000 + "hi", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 1, r.text
    r = post(url, "/v1/chat/completions", {**CHAT, "max_tokens": 2})
    assert r.status_code == 200, r.text


# -- the body size limit ---------------------------------------------------------------------


def test_the_body_size_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LIGHTGATE_MAX_REQUEST_BODY_BYTES", raising=False)
    assert Settings(_env_file=None).max_request_body_bytes == 64 * 1024 * 1024  # type: ignore[call-arg]
    parser = argparse.ArgumentParser()
    add_cli_flags(parser)
    assert load_settings(parser.parse_args(["--max-request-body-bytes", "1000"])).max_request_body_bytes == 1000


@pytest.fixture(scope="module")
def small_body_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessServer]:
    """The tiny model with request bodies of at most BODY_LIMIT bytes (set in the environment)."""
    server = ProcessServer(
        "--model", str(tiny_model_dir), *TINY_ARGS, log_dir=tmp_path_factory.mktemp("logs"),
        env={"LIGHTGATE_MAX_REQUEST_BODY_BYTES": str(BODY_LIMIT)},
    )
    try:
        yield server.wait_healthy()
    finally:
        server.stop()


def _body(size: int) -> bytes:
    """A completion request of exactly `size` bytes (padded in `user`, which the model never sees)."""
    body = json.dumps({"model": TINY, "prompt": "hi", "max_tokens": 2, "user": ""}).encode()
    return body.replace(b'"user": ""', b'"user": "' + b"x" * (size - len(body)) + b'"')


def _assert_413(r: httpx.Response) -> None:
    assert r.status_code == 413, r.text
    assert r.json() == {"error": {
        "message": f"The request body is larger than this server accepts ({BODY_LIMIT} bytes at most; "
                   "see --max-request-body-bytes).",
        "type": "invalid_request_error", "param": None, "code": "request_too_large",
    }}


def test_a_body_over_the_limit_is_413(small_body_server: ProcessServer) -> None:
    url = small_body_server.url
    headers = {"Content-Type": "application/json"}
    with httpx.Client(timeout=60) as client:
        for path in ["/v1/completions", "/v1/chat/completions", "/tokenize"]:
            _assert_413(client.post(url + path, content=_body(BODY_LIMIT + 1), headers=headers))  # Content-Length

            def chunks(size: int) -> Iterator[bytes]:
                body = _body(size)
                for i in range(0, len(body), 1000):
                    yield body[i:i + 1000]

            _assert_413(client.post(url + path, content=chunks(BODY_LIMIT + 1), headers=headers))  # chunked
        # At the limit, either way, and on the same connection after the 413s.
        for content in [_body(BODY_LIMIT), iter([_body(BODY_LIMIT)])]:
            r = client.post(url + "/v1/completions", content=content, headers=headers)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text
    r = post(url, "/v1/chat/completions", {**CHAT, "max_tokens": 2})
    assert r.status_code == 200, r.text


def _read_response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_a_body_over_the_limit_is_not_read(small_body_server: ProcessServer) -> None:
    address = urlparse(small_body_server.url)
    # A declared gigabyte, never sent: the answer comes from the header alone.
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000\r\n\r\n{\"model\":"
        )
        assert _read_response(sock).startswith(b"HTTP/1.1 413 ")
    # A chunked body that never ends: answered once the chunks sent pass the limit.
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"x" * 1000
        for _ in range(BODY_LIMIT // len(chunk) + 1):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            time.sleep(0.01)
        response = _read_response(sock)
        assert response.startswith(b"HTTP/1.1 413 "), response
        assert b'"code":"request_too_large"' in response
