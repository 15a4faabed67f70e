"""Requests that must not cost the server more than an error: a request's own chat template,
a body cut short, a body not declared JSON, stream options without a stream, loose token-id
keys, JSON values of the wrong type, edge seeds; on the shared `tiny_server`."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlparse

import httpx
import pytest

from tests.openai_compat.openai_schema import validate
from tests.openai_compat.servers import CHAT, GREEDY, TINY, ProcessServer, counter, get_metrics, post

# Three nested loops of 10^5: hours of Jinja, were it run.
SLOW_TEMPLATE = (
    "{% for i in range(100000) %}{% for j in range(100000) %}{% for k in range(100000) %}"
    "{% endfor %}{% endfor %}{% endfor %}"
)


def test_a_requests_own_chat_template_is_refused(tiny_server: ProcessServer) -> None:
    url = tiny_server.url
    start = time.monotonic()
    for path, body in [
        ("/v1/chat/completions", {**CHAT, "max_tokens": 3}),
        ("/tokenize", {"model": TINY, "messages": CHAT["messages"]}),
    ]:
        r = post(url, path, {**body, "chat_template_kwargs": {"chat_template": SLOW_TEMPLATE}})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "chat_template_kwargs.chat_template"
    assert time.monotonic() - start < 10  # refused, not rendered
    for key, value in [("tokenize", True), ("tools", [{"type": "function"}]), ("conversation", [])]:
        r = post(url, "/v1/chat/completions", {**CHAT, "max_tokens": 3, "chat_template_kwargs": {key: value}})
        assert r.status_code == 400 and r.json()["error"]["param"] == f"chat_template_kwargs.{key}", r.text
    # Template variables stay allowed.
    r = post(url, "/v1/chat/completions", {**CHAT, "max_tokens": 3, "chat_template_kwargs": {"enable_thinking": False}})
    assert r.status_code == 200, r.text


def test_a_body_cut_short_is_not_a_server_error(tiny_server: ProcessServer) -> None:
    address = urlparse(tiny_server.url)
    for path in ("/v1/completions", "/v1/chat/completions"):
        with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
            sock.sendall(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                '{"model":'.encode()
            )
        time.sleep(0.3)
    assert post(tiny_server.url, "/v1/completions", {"model": TINY, "prompt": "hi", "max_tokens": 2}).status_code == 200
    time.sleep(0.3)
    log = tiny_server.log()
    assert "unexpected error" not in log and "Exception in ASGI application" not in log, log[-2000:]


BODIES = {
    "/v1/chat/completions": {**CHAT, "max_tokens": 2},
    "/v1/completions": {"model": TINY, "prompt": "hi", "max_tokens": 2},
    "/tokenize": {"model": TINY, "prompt": "hi"},
}


@pytest.mark.parametrize("path", list(BODIES))
def test_a_body_not_declared_json_is_refused(tiny_server: ProcessServer, path: str) -> None:
    # As OpenAI's API: a valid JSON body is refused (400 unsupported_content_type, before any
    # work) unless its Content-Type is application/json, with or without parameters.
    url, body = tiny_server.url, json.dumps(BODIES[path]).encode()
    tokens_before = counter(get_metrics(url), "lightgate:generation_tokens_total")
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/jsonl", None):
        headers = {"Content-Type": content_type} if content_type else {}
        r = httpx.post(url + path, content=body, headers=headers, timeout=60)
        assert r.status_code == 400, r.text
        validate("ErrorResponse", r.json())
        error = r.json()["error"]
        assert error["code"] == "unsupported_content_type" and error["type"] == "invalid_request_error"
        assert (content_type or "no Content-Type") in error["message"] and "application/json" in error["message"]
    assert counter(get_metrics(url), "lightgate:generation_tokens_total") == tokens_before  # nothing generated
    for content_type in ("application/json; charset=utf-8", "Application/JSON", "application/json;charset=UTF-8"):
        r = httpx.post(url + path, content=body, headers={"Content-Type": content_type}, timeout=60)
        assert r.status_code == 200, (content_type, r.text)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_stream_options_need_a_stream(tiny_server: ProcessServer, path: str) -> None:
    body = {**CHAT} if "chat" in path else {"model": TINY, "prompt": "hi"}
    r = post(tiny_server.url, path, {**body, "max_tokens": 2, "stream_options": {"include_usage": True}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options", r.text


@pytest.mark.parametrize(
    "key", ["5_0", " 5", "+5", "١٢", "5.0", "9" * 5000],
    ids=["underscore", "space", "plus", "arabic-digits", "float", "5000-digits"],
)
def test_logit_bias_keys_are_plain_integers(tiny_server: ProcessServer, key: str) -> None:
    r = post(tiny_server.url, "/v1/completions", {"model": TINY, "prompt": "hi", "max_tokens": 2, "logit_bias": {key: 1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias", r.text


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_tokens", "2"), ("max_tokens", 2.0), ("n", True), ("stream", "yes"), ("stream", 1), ("temperature", "0.5"),
     ("echo", "false"), ("seed", "7")],
)
def test_json_types_are_not_coerced(tiny_server: ProcessServer, field: str, value: object) -> None:
    # As OpenAI's API: a string, float or bool where the spec says integer (or a string or
    # number where it says boolean) is a 400 naming the field, not read as what it might mean.
    r = post(tiny_server.url, "/v1/completions", {"model": TINY, "prompt": "hi", "max_tokens": 2, field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


def test_integers_are_numbers(tiny_server: ProcessServer) -> None:
    body = {"model": TINY, "prompt": "hi", "max_tokens": 2, "temperature": 1, "top_p": 1, "presence_penalty": 0,
            "logit_bias": {"5": 3}}
    r = post(tiny_server.url, "/v1/completions", body)
    assert r.status_code == 200, r.text


def test_the_largest_seed_with_several_choices(tiny_server: ProcessServer) -> None:
    body = {"model": TINY, "prompt": "hi", "max_tokens": 4, "n": 2, "seed": 2**64 - 1, "temperature": 1.0}
    first = post(tiny_server.url, "/v1/completions", body)
    assert first.status_code == 200, first.text
    again = post(tiny_server.url, "/v1/completions", body)
    assert [c["text"] for c in first.json()["choices"]] == [c["text"] for c in again.json()["choices"]]


def test_context_length_error_of_a_completion_speaks_of_the_prompt(tiny_server: ProcessServer) -> None:
    r = post(tiny_server.url, "/v1/completions", {"model": TINY, "prompt": [5] * 600, "max_tokens": 2, **GREEDY})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "prompt" and error["code"] == "context_length_exceeded"
    assert "in the prompt" in error["message"] and "messages" not in error["message"]


def test_a_text_part_without_its_text_is_named(tiny_server: ProcessServer) -> None:
    messages = [{"role": "user", "content": [{"type": "text"}]}]
    r = post(tiny_server.url, "/v1/chat/completions", {"model": TINY, "messages": messages, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content[0].text", r.text


@pytest.mark.parametrize(
    "stop", [[f"s{i}" for i in range(65)], ["x" * 1025]], ids=["65 strings", "1025 characters"]
)
def test_stop_strings_are_bounded(tiny_server: ProcessServer, stop: list[str]) -> None:
    # Matched at every token on the engine loop's thread: bounded so one request cannot slow all.
    r = post(tiny_server.url, "/v1/completions", {"model": TINY, "prompt": "hi", "max_tokens": 2, "stop": stop})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop", r.text
    r = post(tiny_server.url, "/v1/chat/completions", {**CHAT, "max_tokens": 2, "stop": stop})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop", r.text
    at_the_limits = [f"s{i}" for i in range(63)] + ["x" * 1024]  # 64 strings, one of 1024 characters
    body = {"model": TINY, "prompt": "hi", "max_tokens": 2, "stop": at_the_limits}
    assert post(tiny_server.url, "/v1/completions", body).status_code == 200
