"""The embedded default model (SmolLM2-135M-Instruct) under 64 concurrent streaming chats."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.openai_compat.servers import ProcessServer

pytestmark = pytest.mark.slow

NUM_CLIENTS = 64
MAX_TOKENS = 24


async def test_64_concurrent_streaming_chats(default_server: ProcessServer) -> None:
    url = default_server.url
    models = httpx.get(f"{url}/v1/models").json()["data"]
    assert models[0]["id"] == "SmolLM2-135M-Instruct"
    questions = [f"Give me one fact about the number {i}." for i in range(NUM_CLIENTS)]

    async def chat(client: openai.AsyncOpenAI, question: str) -> tuple[str, int, int, int]:
        stream = await client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": question}],
            max_tokens=MAX_TOKENS, stream=True, stream_options={"include_usage": True}, logprobs=True,
        )
        text, num_logprobs, usage = "", 0, None
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                text += choice.delta.content or ""
                if choice.logprobs is not None and choice.logprobs.content is not None:
                    num_logprobs += len(choice.logprobs.content)
        assert usage is not None
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        return text, num_logprobs, usage.prompt_tokens, usage.completion_tokens

    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=600,
                                  http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=NUM_CLIENTS))) as client:
        results = await asyncio.gather(*(chat(client, q) for q in questions))
    for question, (text, num_logprobs, prompt_tokens, completion_tokens) in zip(questions, results, strict=True):
        messages = [{"role": "user", "content": question}]
        expected_prompt = httpx.post(f"{url}/tokenize", json={"messages": messages}).json()["count"]
        assert prompt_tokens == expected_prompt
        assert 1 <= completion_tokens <= MAX_TOKENS
        assert num_logprobs == completion_tokens  # every generated token, eos included, was counted
        assert text
