"""The HTTP surface of real servers on a tiny random Llama: SSE framing, usage, echo, aborts on
disconnect, 429 on a full queue, 503 while loading and after the worker died, API keys, CORS,
metrics, aliases, tokenize, the `lightgate chat` command and the Python client.

Three servers: the shared `tiny_server` (default settings), `limited_server` (one running
sequence, one waiting, API keys, a long context prefilled two tokens per step) and
`fresh_server` (watched while it loads, then its worker is killed).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.openai_compat.openai_schema import validate
from tests.openai_compat.servers import (
    ALIASES,
    TINY,
    TINY_ARGS,
    ProcessServer,
    free_port,
    get_metrics,
    metric_value,
    sse_events,
    wait_for,
)

PROMPT = [{"role": "user", "content": "Tell me about lighthouses."}]
CHAT: dict[str, Any] = {"model": TINY, "messages": PROMPT}
GREEDY: dict[str, Any] = {"temperature": 0.0}
NO_EOS: dict[str, Any] = {"ignore_eos": True}

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


def post(url: str, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=60, **kwargs)


def stream_chunks(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    events = sse_events(response.content)
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]


def prompt_ids(url: str, **body: Any) -> list[int]:
    return list(post(url, "/tokenize", body).json()["tokens"])


def counter(text: str, name: str, **labels: str) -> float:
    """A counter's value, 0 while it has no sample yet."""
    try:
        return metric_value(text, name, **labels)
    except KeyError:
        return 0.0


def aborts(text: str) -> float:
    return counter(text, "lightgate:request_success_total", finished_reason="abort")


def idle(url: str) -> bool:
    text = get_metrics(url)
    return all(
        metric_value(text, f"lightgate:{name}") == 0
        for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
    )


# -- the shared server: framing, usage, choices, echo ----------------------------------------


def test_chat_stream_framing_and_headers(tiny_server: ProcessServer, tiny_tokenizer: Any) -> None:
    # Six tokens, then eos: its logit is pushed far above the rest once min_tokens allows it.
    body = {**CHAT, **GREEDY, "min_tokens": 6, "logit_bias": {str(tiny_tokenizer.eos_token_id): 100},
            "logprobs": True, "max_tokens": 50}
    full = post(tiny_server.url, "/v1/chat/completions", body).json()
    assert full["choices"][0]["finish_reason"] == "stop"
    assert full["usage"]["completion_tokens"] == 7  # eos counts
    response = post(tiny_server.url, "/v1/chat/completions", {**body, "stream": True})
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    chunks = stream_chunks(response)
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
        assert "usage" not in chunk
        assert chunk["id"].startswith("chatcmpl-") and chunk["id"] == chunks[0]["id"]
        assert chunk["object"] == "chat.completion.chunk" and chunk["model"] == TINY
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == full["choices"][0]["message"]["content"]
    # One chunk per generated token, as it is generated: each carries exactly that token's logprob.
    assert [len(c["choices"][0]["logprobs"]["content"]) for c in chunks[1:]] == [1] * 7


def test_include_usage_only_when_asked(tiny_server: ProcessServer) -> None:
    url = tiny_server.url
    body = {**CHAT, **GREEDY, **NO_EOS, "max_tokens": 5, "stream": True}
    chunks = stream_chunks(post(url, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}}))
    assert all(c["usage"] is None for c in chunks[:-1])
    last = chunks[-1]
    validate("CreateChatCompletionStreamResponse", last)
    assert last["choices"] == []
    num_prompt = len(prompt_ids(url, messages=PROMPT))
    usage = last["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (
        num_prompt, 5, num_prompt + 5
    )
    assert 0 <= usage["prompt_tokens_details"]["cached_tokens"] <= num_prompt
    for options in ({"stream_options": {}}, {"stream_options": {"include_usage": False}}, {}):
        chunks = stream_chunks(post(url, "/v1/chat/completions", {**body, **options}))
        assert all("usage" not in c for c in chunks), options


def test_n2_each_choice_finishes_once(tiny_server: ProcessServer) -> None:
    body = {**CHAT, **GREEDY, **NO_EOS, "max_tokens": 5}
    single = post(tiny_server.url, "/v1/chat/completions", body).json()["choices"][0]["message"]["content"]
    chunks = stream_chunks(post(tiny_server.url, "/v1/chat/completions", {**body, "n": 2, "stream": True}))
    assert [c["choices"][0]["index"] for c in chunks[:2]] == [0, 1]
    assert [c["choices"][0]["delta"].get("role") for c in chunks[:2]] == ["assistant", "assistant"]
    assert not any(c["choices"][0]["delta"].get("role") for c in chunks[2:])
    finishes = [(c["choices"][0]["index"], c["choices"][0]["finish_reason"]) for c in chunks
                if c["choices"][0]["finish_reason"]]
    assert sorted(finishes) == [(0, "length"), (1, "length")]
    for i in (0, 1):
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"][0]["index"] == i)
        assert text == single  # greedy: both choices are the single answer


def test_completion_echo_with_logprobs(tiny_server: ProcessServer) -> None:
    url = tiny_server.url
    prompt = "The lighthouse keeper"
    num_prompt = len(prompt_ids(url, prompt=prompt))
    assert num_prompt > 1
    body = {"model": TINY, "prompt": prompt, "max_tokens": 3, **GREEDY, **NO_EOS}
    plain = post(url, "/v1/completions", body).json()["choices"][0]["text"]
    response = post(url, "/v1/completions", {**body, "echo": True, "logprobs": 1}).json()
    choice = response["choices"][0]
    # OpenAI answers an echoed first token's logprob with null, which its schema does not list.
    validate("CreateCompletionResponse", {**response, "choices": [
        {**choice, "logprobs": {**choice["logprobs"], "token_logprobs": choice["logprobs"]["token_logprobs"][1:],
                                "top_logprobs": choice["logprobs"]["top_logprobs"][1:]}}]})
    assert choice["text"] == prompt + plain
    lp = choice["logprobs"]
    tokens = lp["tokens"]
    assert len(tokens) == num_prompt + 3 and "".join(tokens) == choice["text"]
    assert lp["text_offset"] == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing precedes the first token
    for i in range(1, len(tokens)):
        logprob = lp["token_logprobs"][i]
        assert isinstance(logprob, float) and logprob <= 0
        assert lp["top_logprobs"][i][tokens[i]] == pytest.approx(logprob)  # the actual token is listed
    for i in range(num_prompt, len(tokens)):
        assert list(lp["top_logprobs"][i]) == [tokens[i]]  # greedy: the generated token is the top one
    assert response["usage"]["prompt_tokens"] == num_prompt and response["usage"]["completion_tokens"] == 3


def test_completion_stream_multiple_prompts(tiny_server: ProcessServer) -> None:
    url = tiny_server.url
    prompts = ["The sea", "A lighthouse on the rocks"]
    body = {"model": TINY, "max_tokens": 4, **GREEDY, **NO_EOS}
    expected = [post(url, "/v1/completions", {**body, "prompt": p}).json()["choices"][0]["text"] for p in prompts]
    stream = {**body, "prompt": prompts, "n": 2, "stream": True, "stream_options": {"include_usage": True}}
    chunks = stream_chunks(post(url, "/v1/completions", stream))
    texts: dict[int, str] = {}
    finishes: list[tuple[int, str]] = []
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
        if choice["finish_reason"] is not None:
            finishes.append((choice["index"], choice["finish_reason"]))
    # Choice index = prompt index * n + choice index.
    assert texts == {0: expected[0], 1: expected[0], 2: expected[1], 3: expected[1]}
    assert sorted(finishes) == [(i, "length") for i in range(4)]
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["completion_tokens"] == 16
    assert usage["prompt_tokens"] == sum(len(prompt_ids(url, prompt=p)) for p in prompts)


# -- the shared server: clients hanging up --------------------------------------------------


def test_streaming_disconnect_aborts(tiny_server: ProcessServer) -> None:
    url = tiny_server.url
    before = get_metrics(url)
    body = {**CHAT, **NO_EOS, "max_tokens": 450, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = (line for line in response.iter_lines() if line)
        for _ in range(5):
            assert next(lines).startswith("data: ")
        running = get_metrics(url)
        assert metric_value(running, "lightgate:num_requests_running") == 1
        assert metric_value(running, "lightgate:kv_cache_usage_perc") > 0
    # Leaving the block hung up: the request is aborted and its KV freed at once.
    assert wait_for(lambda: idle(url), timeout=1.0)
    after = get_metrics(url)
    assert aborts(after) == aborts(before) + 1
    generated = counter(after, "lightgate:generation_tokens_total") - counter(before, "lightgate:generation_tokens_total")
    assert 4 <= generated < 450


async def test_nonstreaming_disconnect_aborts(tiny_server: ProcessServer) -> None:
    url = tiny_server.url
    before = await asyncio.to_thread(get_metrics, url)
    body = {"model": TINY, "prompt": "The sea", "max_tokens": 480, **NO_EOS}

    def generating() -> bool:
        text = get_metrics(url)
        return (metric_value(text, "lightgate:num_requests_running") == 1
                and counter(text, "lightgate:generation_tokens_total") > counter(before, "lightgate:generation_tokens_total"))

    async with httpx.AsyncClient(timeout=60) as client:
        request = asyncio.ensure_future(client.post(f"{url}/v1/completions", json=body))
        assert await asyncio.to_thread(wait_for, generating, 10.0)
        request.cancel()  # closes the connection while the server is still generating
        with pytest.raises(asyncio.CancelledError):
            await request
    assert await asyncio.to_thread(wait_for, lambda: idle(url), 1.0)
    after = await asyncio.to_thread(get_metrics, url)
    assert aborts(after) == aborts(before) + 1
    generated = counter(after, "lightgate:generation_tokens_total") - counter(before, "lightgate:generation_tokens_total")
    assert generated < 480


# -- the shared server: metrics, models, tokenize, routes, clients ----------------------------


def test_metrics_names_and_values(tiny_server: ProcessServer) -> None:
    url = tiny_server.url
    before = get_metrics(url)
    response = post(url, "/v1/chat/completions", {**CHAT, **NO_EOS, "max_tokens": 7})
    assert response.status_code == 200
    num_prompt = response.json()["usage"]["prompt_tokens"]
    after = get_metrics(url)
    for name in (
        "lightgate:num_requests_running", "lightgate:num_requests_waiting", "lightgate:kv_cache_usage_perc",
        "lightgate:kv_cache_capacity_tokens", "lightgate:prompt_tokens_total", "lightgate:generation_tokens_total",
        "lightgate:time_to_first_token_seconds_bucket", "lightgate:inter_token_latency_seconds_bucket",
        "lightgate:e2e_request_latency_seconds_bucket", "lightgate:prefix_cache_queries_total",
        "lightgate:prefix_cache_hits_total",
    ):
        metric_value(after, name, model_name=TINY)
    assert "_created" not in after

    def delta(name: str, **labels: str) -> float:
        return counter(after, name, model_name=TINY, **labels) - counter(before, name, model_name=TINY, **labels)

    assert delta("lightgate:request_success_total", finished_reason="length") == 1
    assert delta("lightgate:generation_tokens_total") == 7
    assert delta("lightgate:prompt_tokens_total") == num_prompt
    assert delta("lightgate:time_to_first_token_seconds_count") == 1
    assert delta("lightgate:e2e_request_latency_seconds_count") == 1
    assert 1 <= delta("lightgate:inter_token_latency_seconds_count") <= 6
    # --kv-cache-memory-gb 0.05 of float32 K and V: 2 layers x 2 KV heads x 16 dims x 2 x 4 bytes a token.
    assert metric_value(after, "lightgate:kv_cache_capacity_tokens") == int(0.05 * 2**30) // (2 * 2 * 16 * 2 * 4)
    assert idle(url)


def test_model_endpoints_and_aliases(tiny_server: ProcessServer) -> None:
    url = tiny_server.url
    models = httpx.get(f"{url}/v1/models").json()
    validate("ListModelsResponse", models)
    assert [m["id"] for m in models["data"]] == [TINY, *ALIASES]
    assert all(m["max_model_len"] == 512 for m in models["data"])
    one = httpx.get(f"{url}/v1/models/{ALIASES[0]}").json()
    validate("Model", one)
    assert one["id"] == ALIASES[0]
    missing = httpx.get(f"{url}/v1/models/nope")
    assert missing.status_code == 404
    validate("ErrorResponse", missing.json())
    ok = post(url, "/v1/chat/completions", {**CHAT, "model": ALIASES[1], "max_tokens": 2}).json()
    assert ok["model"] == ALIASES[1]
    ok = post(url, "/v1/completions", {"model": ALIASES[0], "prompt": "Hi", "max_tokens": 2}).json()
    assert ok["model"] == ALIASES[0]
    unknown = post(url, "/v1/chat/completions", {**CHAT, "model": "served-elsewhere"})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"


def test_tokenize_detokenize_version_openapi(tiny_server: ProcessServer, tiny_tokenizer: Any) -> None:
    url = tiny_server.url
    tokens = post(url, "/tokenize", {"prompt": "hey"}).json()
    expected = tiny_tokenizer.encode("hey")
    assert tokens == {"count": len(expected), "max_model_len": 512, "tokens": expected}
    text = "你好,世界! The lighthouse keeper."
    ids = prompt_ids(url, prompt=text)
    assert post(url, "/detokenize", {"tokens": ids}).json() == {"prompt": text}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
    chat = post(url, "/v1/chat/completions", {"model": TINY, "messages": messages, "max_tokens": 1}).json()
    assert post(url, "/tokenize", {"messages": messages}).json()["count"] == chat["usage"]["prompt_tokens"]
    assert post(url, "/detokenize", {"tokens": [len(tiny_tokenizer) + 5]}).status_code == 400
    assert httpx.get(f"{url}/version").json()["version"]
    document = httpx.get(f"{url}/openapi.json").json()
    assert document["openapi"].startswith("3.1")
    assert "/v1/chat/completions" in document["paths"]
    assert "ChatCompletionRequest" in document["components"]["schemas"]


def test_unknown_routes_and_methods_use_the_envelope(tiny_server: ProcessServer) -> None:
    missing = httpx.get(f"{tiny_server.url}/v1/nothing")
    assert missing.status_code == 404
    validate("ErrorResponse", missing.json())
    wrong = httpx.get(f"{tiny_server.url}/v1/chat/completions")
    assert wrong.status_code == 405
    validate("ErrorResponse", wrong.json())


def test_timing_of_many_small_requests(tiny_server: ProcessServer) -> None:
    start = time.monotonic()
    with httpx.Client(timeout=60) as client:
        for _ in range(20):
            response = client.post(f"{tiny_server.url}/v1/chat/completions", json={**CHAT, "max_tokens": 2})
            assert response.status_code == 200
    assert time.monotonic() - start < 5


def test_chat_command_and_python_client(tiny_server: ProcessServer, capsys: pytest.CaptureFixture[str]) -> None:
    from openai_compat import Client
    from openai_compat.cli import main

    url = tiny_server.url
    base_url = f"{url}/v1"

    def answer(system: str, text: str, max_tokens: int) -> str:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": text}]
        body = {"model": TINY, "messages": messages, "max_tokens": max_tokens, **GREEDY}
        return str(post(url, "/v1/chat/completions", body).json()["choices"][0]["message"]["content"])

    expected = answer("short", "你好,世界!", 8)
    assert main(["chat", "--text", "你好,世界!", "--system", "short", "--base-url", base_url,
                 "--max-tokens", "8", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    client = Client(base_url=base_url)
    assert client.model == TINY  # the first model the server lists
    reply = client.query("hi", system="be brief", max_tokens=5, temperature=0)
    assert reply == answer("be brief", "hi", 5)
    assert "".join(client.stream("hi", system="be brief", max_tokens=5, temperature=0)) == reply
    client.close()
    nowhere = f"http://127.0.0.1:{free_port()}/v1"
    assert main(["chat", "--text", "x", "--base-url", nowhere]) == 1
    assert "no lightgate server" in capsys.readouterr().err


# -- limits, keys and CORS: limited_server ----------------------------------------------------


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


def test_repeated_prompt_is_served_from_the_prefix_cache(tiny_server: ProcessServer) -> None:
    """A second request with the same messages reports cached tokens and counts cache hits."""
    url = tiny_server.url
    body = {**NO_EOS, "model": TINY, "max_tokens": 3, "temperature": 0,
            "messages": [{"role": "system", "content": "A long shared system prompt " * 8},
                         {"role": "user", "content": "and a question that repeats"}]}
    first = post(url, "/v1/chat/completions", body).json()
    before = get_metrics(url)
    second = post(url, "/v1/chat/completions", body).json()
    after = get_metrics(url)
    num_prompt = second["usage"]["prompt_tokens"]
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == num_prompt - 1  # all but the last prompt token, which is computed to sample
    assert second["choices"][0]["message"] == first["choices"][0]["message"]

    def delta(name: str) -> float:
        return counter(after, name, model_name=TINY) - counter(before, name, model_name=TINY)

    assert delta("lightgate:prefix_cache_queries_total") == num_prompt
    assert delta("lightgate:prefix_cache_hits_total") == cached
    assert idle(url)
