"""Servers of their own: `limited_server` (one running sequence, one waiting, API keys, slow prefill)
for 429s, aborted prefills, keys and CORS; `fresh_server` for 503 while loading and after its worker dies."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.openai_compat.openai_schema import validate
from tests.openai_compat.servers import (
    CHAT,
    NO_EOS,
    PROMPT,
    TINY,
    TINY_ARGS,
    ProcessServer,
    aborts,
    counter,
    get_metrics,
    idle,
    metric_value,
    post,
    wait_for,
)

KEYS = ("k1", "k2")
AUTH = {"Authorization": f"Bearer {KEYS[0]}"}
LONG_CONTEXT = 4096  # limited_server's context: room for a prefill that takes seconds


@pytest.fixture(scope="module")
def limited_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessServer]:
    """One running sequence and one waiting (the limit set in the environment, as deployments
    do), API keys, and prefill chunks of two tokens, so a long prompt prefills for seconds."""
    server = ProcessServer(
        "--model", str(tiny_model_dir), "--served-model-name", TINY, "--max-model-len", str(LONG_CONTEXT),
        "--kv-cache-memory-gb", "0.05", "--max-num-seqs", "1", "--max-num-batched-tokens", "2",
        log_dir=tmp_path_factory.mktemp("logs"),
        env={"LIGHTGATE_MAX_WAITING_REQUESTS": "1", "LIGHTGATE_API_KEYS": ",".join(KEYS)},
    )
    try:
        yield server.wait_healthy()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def fresh_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessServer]:
    """A server that is not waited for: the first test using it watches it load."""
    server = ProcessServer("--model", str(tiny_model_dir), *TINY_ARGS, log_dir=tmp_path_factory.mktemp("logs"))
    try:
        yield server
    finally:
        server.stop()


# -- limits, keys and CORS: limited_server ----------------------------------------------------


def test_a_request_larger_than_the_queue_is_400_not_429(limited_server: ProcessServer) -> None:
    # One waiting request at most: two choices, or two prompts, could never be queued, and a 429
    # would have the client retry forever.
    url = limited_server.url
    r = post(url, "/v1/chat/completions", {**CHAT, "n": 2, "max_tokens": 2}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
    r = post(url, "/v1/completions", {"model": TINY, "prompt": ["a", "b"], "max_tokens": 2}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text


async def test_full_queue_is_429_with_retry_after(limited_server: ProcessServer) -> None:
    url = limited_server.url
    long = {**CHAT, **NO_EOS, "max_tokens": 2000, "stream": True}

    def gauge(name: str) -> float:
        return metric_value(get_metrics(url), f"lightgate:{name}")

    async with httpx.AsyncClient(timeout=60, headers=AUTH) as client:
        running = asyncio.ensure_future(client.post(f"{url}/v1/chat/completions", json=long))
        assert await asyncio.to_thread(wait_for, lambda: gauge("num_requests_running") == 1, 10.0)
        waiting = asyncio.ensure_future(client.post(f"{url}/v1/chat/completions", json=long))
        assert await asyncio.to_thread(wait_for, lambda: gauge("num_requests_waiting") == 1, 10.0)
        # One sequence runs, one waits: the queue is full.
        refused = [
            await client.post(f"{url}{path}", json=body)
            for path, body in (
                ("/v1/chat/completions", {**CHAT, "max_tokens": 2, "stream": True}),
                ("/v1/chat/completions", {**CHAT, "max_tokens": 2}),
                ("/v1/completions", {"model": TINY, "prompt": "Hi", "max_tokens": 2}),
            )
        ]
        for response in refused:
            assert response.status_code == 429
            assert response.headers["retry-after"] == "1"
            validate("ErrorResponse", response.json())
            assert response.json()["error"]["code"] == "rate_limit_exceeded"
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEYS[0], max_retries=0) as sdk:
            with pytest.raises(openai.RateLimitError):
                await sdk.chat.completions.create(model=TINY, messages=PROMPT, max_tokens=2)  # type: ignore[arg-type]
        assert not running.done() and not waiting.done()
        for request in (running, waiting):
            request.cancel()
        await asyncio.gather(running, waiting, return_exceptions=True)
    assert await asyncio.to_thread(wait_for, lambda: idle(url), 1.0)
    assert post(url, "/v1/chat/completions", {**CHAT, "max_tokens": 2}, headers=AUTH).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
async def test_disconnect_during_a_long_prefill_aborts(limited_server: ProcessServer, stream: bool) -> None:
    url = limited_server.url
    before = await asyncio.to_thread(get_metrics, url)
    max_tokens = 16
    prompt = [100 + (7919 * i) % 40000 for i in range(LONG_CONTEXT - max_tokens - 80)]
    body = {"model": TINY, "prompt": prompt, "max_tokens": max_tokens, "stream": stream}

    def first_tokens(text: str) -> float:
        return counter(text, "lightgate:time_to_first_token_seconds_count", model_name=TINY)

    def prefilling() -> bool:
        text = get_metrics(url)
        return metric_value(text, "lightgate:kv_cache_usage_perc") > 0 and first_tokens(text) == first_tokens(before)

    async with httpx.AsyncClient(timeout=60, headers=AUTH) as client:
        request = asyncio.ensure_future(client.post(f"{url}/v1/completions", json=body))
        assert await asyncio.to_thread(wait_for, prefilling, 10.0)
        request.cancel()  # hang up while the prompt is still being prefilled
        with pytest.raises(asyncio.CancelledError):
            await request
    assert await asyncio.to_thread(wait_for, lambda: idle(url), 1.0)
    after = await asyncio.to_thread(get_metrics, url)
    assert first_tokens(after) == first_tokens(before)  # the prefill never finished
    assert aborts(after) == aborts(before) + 1


def test_api_keys(limited_server: ProcessServer) -> None:
    url = limited_server.url
    body = {**CHAT, "max_tokens": 2}
    for headers in ({"Authorization": "Bearer no"}, {}, {"Authorization": f"Basic {KEYS[0]}"},
                    {"Authorization": f"Bearer {KEYS[0]}x"}):
        response = post(url, "/v1/chat/completions", body, headers=headers)
        assert response.status_code == 401, headers
        validate("ErrorResponse", response.json())
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert post(url, "/tokenize", {"prompt": "hi"}).status_code == 401
    for path in ("/health", "/metrics", "/version", "/openapi.json"):  # probes and scrapers need no key
        assert httpx.get(f"{url}{path}").status_code == 200, path
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    for key in KEYS:
        models = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0).models.list()
        assert [m.id for m in models.data] == [TINY]
    assert post(url, "/v1/chat/completions", body, headers={"Authorization": f"bearer {KEYS[1]}"}).status_code == 200


def test_cors_preflight_allows_sdk_headers_without_a_key(limited_server: ProcessServer) -> None:
    url = limited_server.url
    origin = {"Origin": "http://ui.example"}
    preflight = {
        **origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os, x-stainless-retry-count",
    }
    response = httpx.options(f"{url}/v1/chat/completions", headers=preflight)  # browsers send no key here
    assert response.status_code == 200
    allowed = response.headers["access-control-allow-headers"].lower()
    for header in ("authorization", "content-type", "x-stainless-os", "x-stainless-retry-count"):
        assert header in allowed
    assert "POST" in response.headers["access-control-allow-methods"]
    body = {**CHAT, "max_tokens": 2}
    ok = post(url, "/v1/chat/completions", body, headers={**origin, **AUTH})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "*"
    refused = post(url, "/v1/chat/completions", body, headers=origin)  # the page can read why
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "*"


# -- loading and a dead worker: fresh_server ---------------------------------------------------


def test_503_while_loading_then_ready(fresh_server: ProcessServer) -> None:
    url = fresh_server.url
    first: httpx.Response | None = None
    deadline = time.monotonic() + 120
    while first is None:  # the server's very first answer, a few ms after it listens
        assert fresh_server.proc.poll() is None, fresh_server.log()
        assert time.monotonic() < deadline, fresh_server.log()
        try:
            first = httpx.get(f"{url}/health", timeout=5)
        except httpx.TransportError:
            time.sleep(0.01)
    assert first.status_code == 503 and first.json() == {"status": "loading"}
    for response in (post(url, "/v1/chat/completions", CHAT), httpx.get(f"{url}/v1/models")):
        assert response.status_code == 503
        validate("ErrorResponse", response.json())
        assert response.json()["error"]["code"] == "service_unavailable"
        assert "loading" in response.json()["error"]["message"]
    fresh_server.wait_healthy()
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert post(url, "/v1/chat/completions", {**CHAT, "max_tokens": 2}).status_code == 200


def test_worker_death_mid_stream_then_503(fresh_server: ProcessServer) -> None:
    server = fresh_server.wait_healthy()
    url = server.url
    worker = server.worker_pid()
    body = {**CHAT, **NO_EOS, "max_tokens": 450, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = (line for line in response.iter_lines() if line)
        head = [next(lines) for _ in range(3)]  # the role chunk and two tokens
        os.kill(worker, signal.SIGKILL)
        lines_after = list(lines)
    events = []
    for line in head + lines_after:
        assert line.startswith("data: "), line
        events.append(line[len("data: "):])
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])
    validate("ErrorResponse", error)
    assert error["error"]["type"] == "server_error"
    chunks = [json.loads(e) for e in events[:-2]]
    assert len(chunks) >= 3 and all(c["choices"][0]["finish_reason"] is None for c in chunks)
    for _ in range(2):  # the server stays up and says it cannot serve, to probes and clients alike
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and health.json() == {"status": "unavailable"}
        refused = post(url, "/v1/chat/completions", CHAT)
        assert refused.status_code == 503
        validate("ErrorResponse", refused.json())
        assert refused.json()["error"]["type"] == "server_error"
        assert httpx.get(f"{url}/metrics").status_code == 200
        time.sleep(0.5)
    # Then the server stops by itself with a non-zero status, for a supervisor to restart it.
    assert server.proc.wait(timeout=30) == 1
