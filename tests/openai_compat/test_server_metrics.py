"""Metrics and disconnects on the shared tiny server: Prometheus names and values, requests aborted
when the client hangs up, and prefix-cache hits for a repeated prompt."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.openai_compat.servers import (
    CHAT,
    NO_EOS,
    TINY,
    ProcessServer,
    aborts,
    counter,
    get_metrics,
    idle,
    metric_value,
    post,
    wait_for,
)

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


# -- the shared server: metrics and the prefix cache -----------------------------------------


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
