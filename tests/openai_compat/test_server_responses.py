"""Chat and completion responses from the shared tiny server over plain HTTP (SSE framing, usage,
n choices, echo), plus models and aliases, tokenize, routes, `lightgate chat` and the Python client."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.openai_compat.openai_schema import validate
from tests.openai_compat.servers import (
    ALIASES,
    CHAT,
    GREEDY,
    NO_EOS,
    PROMPT,
    TINY,
    ProcessServer,
    free_port,
    post,
    prompt_ids,
    stream_chunks,
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


# -- the shared server: models, tokenize, routes, clients ------------------------------------


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


def test_many_small_requests_on_one_connection(tiny_server: ProcessServer) -> None:
    # One keep-alive connection, request after request: each is answered in full (no request
    # left behind by the one before it). How fast is a benchmark's business, not a test's.
    with httpx.Client(timeout=60) as client:
        for _ in range(20):
            response = client.post(f"{tiny_server.url}/v1/chat/completions", json={**CHAT, "max_tokens": 2})
            assert response.status_code == 200
            assert response.json()["usage"]["completion_tokens"] <= 2


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
