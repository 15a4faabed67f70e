"""The HTTP surface over a scripted engine: framing, errors, aborts, auth, CORS, metrics."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.openai_compat.conftest import ThreadServer, fake_server, get_metrics, metric_value, wait_for
from tests.openai_compat.fake_engine import FakeEngine
from tests.openai_compat.openai_schema import validate

REPLY = "Hello world, this is lightgate."
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


def sse_events(body: bytes) -> list[str]:
    """The data of each event; asserts the exact framing on the way."""
    text = body.decode()
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    for event in events:
        assert event.startswith("data: ") and "\n" not in event, event
    return [event[len("data: "):] for event in events]


def stream_chat(url: str, **extra: object) -> tuple[httpx.Response, list[str]]:
    response = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "stream": True, **extra}, timeout=10)
    return response, sse_events(response.content)


def test_chat_stream_framing_and_headers(fake: ThreadServer) -> None:
    response, events = stream_chat(fake.url)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
        assert "usage" not in chunk
        assert chunk["id"].startswith("chatcmpl-") and chunk["id"] == chunks[0]["id"]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == REPLY
    assert all(len(c["choices"][0]["delta"].get("content") or "x") == 1 for c in chunks[1:-1])  # one token each


def test_include_usage_only_when_asked(fake: ThreadServer) -> None:
    _, events = stream_chat(fake.url, stream_options={"include_usage": True})
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["usage"] is None for c in chunks[:-1])
    last = chunks[-1]
    validate("CreateChatCompletionStreamResponse", last)
    assert last["choices"] == []
    prompt_len = len("<user>hi\n<assistant>")
    assert last["usage"] == {
        "prompt_tokens": prompt_len, "completion_tokens": len(REPLY) + 1, "total_tokens": prompt_len + len(REPLY) + 1,
        "prompt_tokens_details": {"cached_tokens": 3},
    }
    _, events = stream_chat(fake.url, stream_options={})
    assert all("usage" not in json.loads(e) for e in events[:-1])


def test_n2_each_choice_finishes_once(fake: ThreadServer) -> None:
    _, events = stream_chat(fake.url, n=2, max_tokens=5)
    chunks = [json.loads(e) for e in events[:-1]]
    finishes = [(c["choices"][0]["index"], c["choices"][0]["finish_reason"]) for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(finishes) == [(0, "length"), (1, "length")]
    roles = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["delta"].get("role")]
    assert roles == [0, 1]
    for i in (0, 1):
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"][0]["index"] == i)
        assert text == REPLY[:5]


def test_completion_echo_with_logprobs(fake: ThreadServer) -> None:
    body = {"model": "fake-model", "prompt": "abc", "max_tokens": 3, "echo": True, "logprobs": 1}
    response = httpx.post(f"{fake.url}/v1/completions", json=body, timeout=10).json()
    choice = response["choices"][0]
    assert choice["text"] == "abc" + REPLY[:3]
    lp = choice["logprobs"]
    assert lp["tokens"] == ["a", "b", "c", "H", "e", "l"]
    assert lp["token_logprobs"][0] is None and lp["token_logprobs"][1] == -2.0 and lp["token_logprobs"][3] == -0.25
    assert lp["text_offset"] == [0, 1, 2, 3, 4, 5]
    assert lp["top_logprobs"][3] == {"H": -0.25}
    assert response["usage"]["prompt_tokens"] == 3 and response["usage"]["completion_tokens"] == 3


def test_completion_stream_multiple_prompts(fake: ThreadServer) -> None:
    body = {"model": "fake-model", "prompt": ["a", "b"], "max_tokens": 4, "n": 2, "stream": True,
            "stream_options": {"include_usage": True}}
    events = sse_events(httpx.post(f"{fake.url}/v1/completions", json=body, timeout=10).content)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    texts: dict[int, str] = {}
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert texts == {i: REPLY[:4] for i in range(4)}
    assert chunks[-1]["usage"]["completion_tokens"] == 16 and chunks[-1]["usage"]["prompt_tokens"] == 2


def test_streaming_disconnect_aborts() -> None:
    engine = FakeEngine(reply="x" * 1000, step_delay=0.02)
    with fake_server(engine) as server:
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 4:
                    break
        assert wait_for(lambda: engine.aborted and not engine.running, timeout=1.0)
        text = get_metrics(server.url)
        assert metric_value(text, "lightgate:num_requests_running") == 0
        assert 'finished_reason="abort"' in text


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_during_prefill_aborts(stream: bool) -> None:
    engine = FakeEngine()
    engine.first_token_delay = 30.0
    with fake_server(engine) as server:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/chat/completions", json={**CHAT, "stream": stream}, timeout=0.5)
        assert wait_for(lambda: engine.aborted and not engine.running, timeout=1.0)


def test_nonstreaming_disconnect_aborts() -> None:
    engine = FakeEngine(reply="y" * 1000, step_delay=0.02, max_model_len=4096)
    with fake_server(engine) as server:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/completions", json={"model": "fake-model", "prompt": "p", "max_tokens": 900},
                       timeout=0.3)
        assert wait_for(lambda: engine.aborted and not engine.running, timeout=1.0)


def test_overloaded_is_429_with_retry_after(fake: ThreadServer) -> None:
    fake.engine.overloaded = True
    response = httpx.post(f"{fake.url}/v1/chat/completions", json={**CHAT, "stream": True}, timeout=10)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    client = openai.OpenAI(base_url=f"{fake.url}/v1", max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(**CHAT)  # type: ignore[call-overload]


def test_503_while_loading_then_ready() -> None:
    with ThreadServer(FakeEngine(load_delay=1.0)) as server:
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 503
        response = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT)
        assert response.status_code == 503
        validate("ErrorResponse", response.json())
        server.wait_loaded()
        assert httpx.get(f"{server.url}/health").status_code == 200
        assert httpx.post(f"{server.url}/v1/chat/completions", json=CHAT).status_code == 200


def test_worker_death_mid_stream_then_503() -> None:
    engine = FakeEngine(step_delay=0.01)
    engine.die_after_steps = 3
    with fake_server(engine) as server:
        _, events = stream_chat(server.url)
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])
        validate("ErrorResponse", error)
        assert error["error"]["type"] == "server_error"
        assert "content" in json.loads(events[-3])["choices"][0]["delta"]
        from engine import EngineDeadError

        engine.dead_error = EngineDeadError("the worker died")
        assert httpx.get(f"{server.url}/health").status_code == 503
        assert httpx.post(f"{server.url}/v1/chat/completions", json=CHAT).status_code == 503


def test_api_keys() -> None:
    with fake_server(api_keys="k1,k2") as server:
        response = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer no"})
        assert response.status_code == 401
        validate("ErrorResponse", response.json())
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.post(f"{server.url}/v1/chat/completions", json=CHAT).status_code == 401
        assert httpx.get(f"{server.url}/health").status_code == 200
        assert httpx.get(f"{server.url}/metrics").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong").models.list()
        models = openai.OpenAI(base_url=f"{server.url}/v1", api_key="k2").models.list()
        assert [m.id for m in models.data] == ["fake-model"]


def test_cors_preflight_allows_sdk_headers(fake: ThreadServer) -> None:
    headers = {
        "Origin": "http://ui.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os, x-stainless-retry-count",
    }
    response = httpx.options(f"{fake.url}/v1/chat/completions", headers=headers)
    assert response.status_code == 200
    allowed = response.headers["access-control-allow-headers"].lower()
    for header in ("authorization", "x-stainless-os", "x-stainless-retry-count"):
        assert header in allowed
    response = httpx.post(f"{fake.url}/v1/chat/completions", json=CHAT, headers={"Origin": "http://ui.example"})
    assert response.headers["access-control-allow-origin"] == "*"


def test_metrics_names(fake: ThreadServer) -> None:
    httpx.post(f"{fake.url}/v1/chat/completions", json=CHAT, timeout=10)
    text = get_metrics(fake.url)
    for name in (
        "lightgate:num_requests_running", "lightgate:num_requests_waiting", "lightgate:kv_cache_usage_perc",
        "lightgate:kv_cache_capacity_tokens", "lightgate:prompt_tokens_total", "lightgate:generation_tokens_total",
        "lightgate:time_to_first_token_seconds_bucket", "lightgate:inter_token_latency_seconds_bucket",
        "lightgate:e2e_request_latency_seconds_bucket", "lightgate:prefix_cache_queries_total",
        "lightgate:prefix_cache_hits_total",
    ):
        metric_value(text, name)
    assert 'lightgate:request_success_total{finished_reason="stop",model_name="fake-model"} 1.0' in text
    assert metric_value(text, "lightgate:generation_tokens_total") == len(REPLY) + 1
    assert metric_value(text, "lightgate:kv_cache_capacity_tokens") == 1000


def test_draining_refuses_new_requests(fake: ThreadServer) -> None:
    fake.state.draining = True
    assert httpx.post(f"{fake.url}/v1/chat/completions", json=CHAT).status_code == 503
    assert httpx.get(f"{fake.url}/health").status_code == 503


def test_model_endpoints_and_aliases() -> None:
    with fake_server(served_model_name="served", model_aliases="alias-a,alias-b") as server:
        models = httpx.get(f"{server.url}/v1/models").json()
        validate("ListModelsResponse", models)
        assert [m["id"] for m in models["data"]] == ["served", "alias-a", "alias-b"]
        one = httpx.get(f"{server.url}/v1/models/alias-a").json()
        validate("Model", one)
        assert httpx.get(f"{server.url}/v1/models/nope").status_code == 404
        ok = httpx.post(f"{server.url}/v1/chat/completions", json={**CHAT, "model": "alias-b"}).json()
        assert ok["model"] == "alias-b"
        missing = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT)
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"


def test_tokenize_detokenize_version_openapi(fake: ThreadServer) -> None:
    tokens = httpx.post(f"{fake.url}/tokenize", json={"prompt": "hey"}).json()
    assert tokens == {"count": 3, "max_model_len": 256, "tokens": [104, 101, 121]}
    chat = httpx.post(f"{fake.url}/tokenize", json={"messages": [{"role": "user", "content": "a"}]}).json()
    assert chat["count"] == len("<user>a\n<assistant>")
    assert httpx.post(f"{fake.url}/detokenize", json={"tokens": [104, 105]}).json() == {"prompt": "hi"}
    assert httpx.get(f"{fake.url}/version").json()["version"]
    document = httpx.get(f"{fake.url}/openapi.json").json()
    assert document["openapi"].startswith("3.1")
    assert "/v1/chat/completions" in document["paths"]
    assert "ChatCompletionRequest" in document["components"]["schemas"]


def test_timing_of_many_small_requests(fake: ThreadServer) -> None:
    start = time.monotonic()
    with httpx.Client() as client:
        for _ in range(20):
            assert client.post(f"{fake.url}/v1/chat/completions", json={**CHAT, "max_tokens": 2}).status_code == 200
    assert time.monotonic() - start < 5


def test_chat_command_and_python_client(fake: ThreadServer, capsys: pytest.CaptureFixture[str]) -> None:
    from openai_compat import Client
    from openai_compat.cli import main

    assert main(["chat", "--text", "你好,世界!", "--system", "short", "--base-url", f"{fake.url}/v1"]) == 0
    assert capsys.readouterr().out == REPLY + "\n"
    client = Client(base_url=f"{fake.url}/v1")
    assert client.model == "fake-model"
    assert client.query("hi", system="be brief", max_tokens=5) == REPLY[:5]
    assert "".join(client.stream("hi")) == REPLY
    client.close()
    assert main(["chat", "--text", "x", "--base-url", "http://127.0.0.1:9/v1"]) == 1


def test_unknown_routes_and_methods_use_the_envelope(fake: ThreadServer) -> None:
    missing = httpx.get(f"{fake.url}/v1/nothing")
    assert missing.status_code == 404
    validate("ErrorResponse", missing.json())
    wrong = httpx.get(f"{fake.url}/v1/chat/completions")
    assert wrong.status_code == 405
    validate("ErrorResponse", wrong.json())
