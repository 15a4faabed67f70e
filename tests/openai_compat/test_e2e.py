"""A real server process on a tiny random Llama, driven by the openai SDK, LangChain and httpx.

Every response body and every stream chunk is checked against OpenAI's published schemas.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from tests.openai_compat.openai_schema import validate
from tests.openai_compat.servers import TINY, TINY_ARGS, ProcessServer, get_metrics, metric_value, wait_for

PROMPT = [{"role": "user", "content": "Tell me about lighthouses."}]
GREEDY: dict[str, Any] = {"temperature": 0.0}
NO_EOS: dict[str, Any] = {"extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def client(tiny_server: ProcessServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="x", max_retries=0)


@pytest.fixture
async def aclient(tiny_server: ProcessServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{tiny_server.url}/v1", api_key="x", max_retries=0) as client:
        yield client


def raw_events(url: str, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    response = httpx.post(url + path, json={**body, "stream": True}, timeout=60)
    assert response.status_code == 200, response.text
    text = response.text
    assert text.endswith("data: [DONE]\n\n")
    events = text[:-2].split("\n\n")
    assert all(e.startswith("data: ") for e in events)
    return [json.loads(e[6:]) for e in events[:-1]]


def prompt_len(url: str, messages: list[dict[str, Any]]) -> int:
    return int(httpx.post(f"{url}/tokenize", json={"messages": messages}).json()["count"])


def test_chat_sync_nonstream_and_stream_agree(client: openai.OpenAI, tiny_server: ProcessServer) -> None:
    full = client.chat.completions.create(model=TINY, messages=PROMPT, max_tokens=12, **GREEDY)  # type: ignore[arg-type]
    assert full.id.startswith("chatcmpl-") and full.object == "chat.completion" and full.model == TINY
    assert full.usage is not None and full.usage.prompt_tokens == prompt_len(tiny_server.url, PROMPT)
    assert full.usage.prompt_tokens_details is not None and full.usage.prompt_tokens_details.cached_tokens is not None
    stream = client.chat.completions.create(model=TINY, messages=PROMPT, max_tokens=12, stream=True, **GREEDY)  # type: ignore[arg-type]
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == full.choices[0].message.content


async def test_chat_async_stream_with_usage(aclient: openai.AsyncOpenAI) -> None:
    stream = await aclient.chat.completions.create(
        model=TINY, messages=PROMPT, max_completion_tokens=7, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True}, **GREEDY, **NO_EOS,
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 7
    assert chunks[-2].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks[:-1])
    full = await aclient.chat.completions.create(model=TINY, messages=PROMPT, max_tokens=5, **GREEDY)  # type: ignore[arg-type]
    assert full.choices[0].message.role == "assistant"


def test_max_completion_tokens_exact_with_logprobs(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=TINY, messages=PROMPT, max_completion_tokens=9, logprobs=True, top_logprobs=3,  # type: ignore[arg-type]
        **GREEDY, **NO_EOS,
    )
    choice = response.choices[0]
    assert choice.finish_reason == "length" and response.usage is not None
    assert response.usage.completion_tokens == 9
    assert choice.logprobs is not None and choice.logprobs.content is not None
    assert len(choice.logprobs.content) == 9
    for entry in choice.logprobs.content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-4)  # greedy: the top token
    assert "".join(e.token for e in choice.logprobs.content) == choice.message.content


def test_n2_and_seed(client: openai.OpenAI) -> None:
    two = client.chat.completions.create(model=TINY, messages=PROMPT, n=2, max_tokens=6, seed=11)  # type: ignore[arg-type]
    assert [c.index for c in two.choices] == [0, 1]
    again = client.chat.completions.create(model=TINY, messages=PROMPT, n=2, max_tokens=6, seed=11)  # type: ignore[arg-type]
    assert [c.message.content for c in again.choices] == [c.message.content for c in two.choices]
    stream = client.chat.completions.create(model=TINY, messages=PROMPT, n=2, max_tokens=4, stream=True)  # type: ignore[arg-type]
    finished = [c.choices[0].index for c in stream if c.choices and c.choices[0].finish_reason]
    assert sorted(finished) == [0, 1]


def test_stop_string(client: openai.OpenAI) -> None:
    base = client.completions.create(model=TINY, prompt="The sea", max_tokens=16, logprobs=0, **GREEDY, **NO_EOS)
    tokens = base.choices[0].logprobs.tokens  # type: ignore[union-attr]
    assert tokens is not None
    stop = next(t for t in tokens[4:] if t.strip() and not t.startswith("bytes:"))
    text = base.choices[0].text
    cut = client.completions.create(model=TINY, prompt="The sea", max_tokens=16, stop=[stop], **GREEDY, **NO_EOS)
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]


async def test_completions_sync_async_stream_and_echo(client: openai.OpenAI, aclient: openai.AsyncOpenAI) -> None:
    full = client.completions.create(model=TINY, prompt="Once upon a time", max_tokens=8, **GREEDY)
    assert full.id.startswith("cmpl-") and full.object == "text_completion"
    stream = await aclient.completions.create(model=TINY, prompt="Once upon a time", max_tokens=8, stream=True, **GREEDY)
    text = "".join([c.choices[0].text async for c in stream if c.choices])
    assert text == full.choices[0].text
    echo = client.completions.create(model=TINY, prompt="Once upon a time", max_tokens=3, echo=True, logprobs=2, **GREEDY)
    lp = echo.choices[0].logprobs
    assert echo.choices[0].text.startswith("Once upon a time")
    assert lp is not None and lp.token_logprobs is not None and lp.token_logprobs[0] is None
    assert echo.usage is not None and len(lp.token_logprobs) == echo.usage.prompt_tokens + 3
    ids = client.completions.create(model=TINY, prompt=[[1, 2, 3], [4, 5]], max_tokens=2)
    assert [c.index for c in ids.choices] == [0, 1] and ids.usage is not None and ids.usage.prompt_tokens == 5


def test_every_body_and_chunk_matches_openai_schemas(tiny_server: ProcessServer) -> None:
    url = tiny_server.url
    chat = {"model": TINY, "messages": PROMPT, "max_tokens": 4}
    for extra in ({}, {"n": 2, "logprobs": True, "top_logprobs": 2}, {"stream_options": {"include_usage": True}}):
        if "stream_options" not in extra:  # only allowed with stream: true (a 400 otherwise, as OpenAI's)
            body = httpx.post(f"{url}/v1/chat/completions", json={**chat, **extra}, timeout=60).json()
            validate("CreateChatCompletionResponse", body)
        for chunk in raw_events(url, "/v1/chat/completions", {**chat, **extra}):
            validate("CreateChatCompletionStreamResponse", chunk)
    completion = {"model": TINY, "prompt": "Hi", "max_tokens": 4}
    for extra in ({}, {"n": 2, "logprobs": 2}, {"prompt": ["a", "b"]}):
        validate("CreateCompletionResponse", httpx.post(f"{url}/v1/completions", json={**completion, **extra}).json())
        for chunk in raw_events(url, "/v1/completions", {**completion, **extra}):
            # OpenAI streams `finish_reason: null` on completions chunks although its schema
            # (shared with the final object) lists no null; accept exactly that difference.
            for choice in chunk["choices"]:
                choice["finish_reason"] = choice["finish_reason"] or "stop"
            validate("CreateCompletionResponse", chunk)
    validate("ListModelsResponse", httpx.get(f"{url}/v1/models").json())
    validate("Model", httpx.get(f"{url}/v1/models/{TINY}").json())


def test_langchain_invoke_stream_batch(tiny_server: ProcessServer) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{tiny_server.url}/v1", api_key="x", model=TINY, max_tokens=6, temperature=0)  # type: ignore[arg-type]
    answer = llm.invoke("Hello!")
    assert isinstance(answer.content, str)
    streamed = "".join(str(chunk.content) for chunk in llm.stream("Hello!"))
    assert streamed == answer.content
    batch = llm.batch(["One", "Two", "Three"])
    assert len(batch) == 3 and all(isinstance(m.content, str) for m in batch)


BAD_INPUTS = [
    ("malformed JSON", "/v1/chat/completions", b'{"model": "tiny", "messages": [', 400, None),
    ("body is a list", "/v1/chat/completions", b"[1, 2]", 400, None),
    ("messages wrong type", "/v1/chat/completions", {"model": TINY, "messages": "hi"}, 400, "messages"),
    ("empty messages", "/v1/chat/completions", {"model": TINY, "messages": []}, 400, "messages"),
    ("unknown role", "/v1/chat/completions", {"model": TINY, "messages": [{"role": "bot", "content": "x"}]}, 400,
     "messages[0].role"),
    ("temperature too high", "/v1/chat/completions", {"model": TINY, "messages": PROMPT, "temperature": 3}, 400,
     "temperature"),
    ("n zero", "/v1/chat/completions", {"model": TINY, "messages": PROMPT, "n": 0}, 400, "n"),
    ("max_tokens string", "/v1/chat/completions", {"model": TINY, "messages": PROMPT, "max_tokens": "many"}, 400,
     "max_tokens"),
    ("top_p zero", "/v1/chat/completions", {"model": TINY, "messages": PROMPT, "top_p": 0}, 400, "top_p"),
    ("missing model", "/v1/chat/completions", {"messages": PROMPT}, 400, "model"),
    ("tool without function", "/v1/chat/completions",
     {"model": TINY, "messages": PROMPT, "tools": [{"type": "function"}]}, 400, "tools[0].function"),
    ("json_schema without schema", "/v1/chat/completions",
     {"model": TINY, "messages": PROMPT, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     400, "response_format.json_schema.schema"),
    ("functions", "/v1/chat/completions", {"model": TINY, "messages": PROMPT, "functions": [{"name": "f"}]}, 400,
     "functions"),
    ("prompt past the context", "/v1/chat/completions",
     {"model": TINY, "messages": [{"role": "user", "content": "word " * 600}]}, 400, "messages"),
    ("max_tokens past the context", "/v1/completions", {"model": TINY, "prompt": "hi", "max_tokens": 5000}, 400,
     "prompt"),
    ("unknown model", "/v1/chat/completions", {"model": "gpt-9", "messages": PROMPT}, 404, "model"),
    ("suffix", "/v1/completions", {"model": TINY, "prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("prompt wrong type", "/v1/completions", {"model": TINY, "prompt": {"a": 1}}, 400, "prompt"),
    ("token id out of vocab", "/v1/completions", {"model": TINY, "prompt": [10**9]}, 400, "prompt"),
    ("logprobs too many", "/v1/completions", {"model": TINY, "prompt": "x", "logprobs": 50}, 400, "logprobs"),
]


@pytest.mark.parametrize(("name", "path", "body", "status", "param"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs(tiny_server: ProcessServer, name: str, path: str, body: Any, status: int, param: str | None) -> None:
    if isinstance(body, bytes):
        response = httpx.post(tiny_server.url + path, content=body, headers={"content-type": "application/json"})
    else:
        response = httpx.post(tiny_server.url + path, json=body, timeout=60)
    assert response.status_code == status, response.text
    validate("ErrorResponse", response.json())
    error = response.json()["error"]
    assert error["param"] == param
    if name.endswith("context"):
        assert error["message"].startswith("This model's maximum context length is 512 tokens. However, you requested")
    ok = httpx.post(f"{tiny_server.url}/v1/completions", json={"model": TINY, "prompt": "ok", "max_tokens": 2})
    assert ok.status_code == 200


async def test_fifty_clients_hang_up_mid_stream(tiny_server: ProcessServer) -> None:
    body = {"model": TINY, "messages": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}

    async def hang_up(client: httpx.AsyncClient) -> None:
        async with client.stream("POST", f"{tiny_server.url}/v1/chat/completions", json=body) as response:
            seen = 0
            async for line in response.aiter_lines():
                seen += line.startswith("data: ")
                if seen >= 3:
                    return  # leaving the block closes the connection mid-stream

    limits = httpx.Limits(max_connections=60)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await asyncio.gather(*(hang_up(client) for _ in range(50)))

    def idle() -> bool:
        text = get_metrics(tiny_server.url)
        return (
            metric_value(text, "lightgate:num_requests_running") == 0
            and metric_value(text, "lightgate:kv_cache_usage_perc") == 0
        )

    assert await asyncio.to_thread(wait_for, idle, 1.0, 0.05)
    assert 'finished_reason="abort"' in get_metrics(tiny_server.url)


def status_or_refused(method: str, url: str, **kwargs: Any) -> int | None:
    """The status of a request on a new connection; None when the server takes no more connections."""
    try:
        response = httpx.request(method, url, timeout=10, **kwargs)
    except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
        return None
    if response.status_code == 503 and "/v1/" in url:
        validate("ErrorResponse", response.json())
    return response.status_code


def test_sigterm_drains_finishes_running_requests_then_exits_0(tiny_model_dir: Any, tmp_path: Any) -> None:
    server = ProcessServer("--model", str(tiny_model_dir), *TINY_ARGS, log_dir=tmp_path).wait_healthy()
    body = {"model": TINY, "messages": PROMPT, "max_tokens": 60, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        server.proc.send_signal(15)
        # Draining: load balancers see the server leave (503 or no more connections) and new
        # requests are refused, while the running stream goes on.
        assert status_or_refused("GET", f"{server.url}/health") in (503, None)
        chat = {"model": TINY, "messages": PROMPT, "max_tokens": 2}
        assert status_or_refused("POST", f"{server.url}/v1/chat/completions", json=chat) in (503, None)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][6:])["usage"]["completion_tokens"] == 60
    assert server.stop() == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health")


def test_the_shutdown_timeout_ends_running_requests_with_an_error_then_exits(tiny_model_dir: Any, tmp_path: Any) -> None:
    """Requests still running when the drain's time is up end as OpenAI ends a failed request: a
    stream with an error event and `[DONE]` (not a connection cut mid-body), a plain request with
    a 503; then the server exits 0."""
    timeout = 3.0
    server = ProcessServer(
        "--model", str(tiny_model_dir), *TINY_ARGS, "--max-model-len", "4096", "--shutdown-timeout", str(timeout),
        log_dir=tmp_path,
    ).wait_healthy()
    long = {"model": TINY, "messages": PROMPT, "max_tokens": 4000, "ignore_eos": True}  # far past the timeout
    with ThreadPoolExecutor(1) as pool:
        plain = pool.submit(httpx.post, f"{server.url}/v1/chat/completions", json=long, timeout=60)
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**long, "stream": True},
                          timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            assert wait_for(lambda: metric_value(get_metrics(server.url), "lightgate:num_requests_running") == 2, 30)
            server.proc.send_signal(15)
            signalled = time.monotonic()
            rest = [line for line in lines if line]  # raises if the body is cut
            ended = time.monotonic() - signalled
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2][6:])
        validate("ErrorResponse", error)
        assert error["error"]["code"] == "aborted" and len(rest) > 2  # it streamed on while draining
        assert timeout - 0.5 <= ended <= timeout + 5, ended
        answer = plain.result()
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "aborted", answer.text
    assert server.stop(timeout=30) == 0
    assert time.monotonic() - signalled < timeout + 30
    log = server.log()
    assert "Traceback" not in log and "timeout graceful shutdown exceeded" not in log, log[-3000:]
