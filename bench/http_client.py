"""Sending a `lightgate bench serve` workload: its requests, their arrivals, each one timed.

A `Workload` becomes seeded random token-id prompts (`build_requests`) and send times
(`arrival_times`); `run_workload` sends them to `/v1/completions` at those times under the
concurrency cap, spread over several httpx clients, and `send_request` times every text chunk
of one streamed completion as `SSEParser` cuts the events from the body. A request that fails
comes back as a `RequestResult` with its error, never as an exception. `first_model`,
`server_info` and `warm_up` are the other calls made before measuring. Nothing here computes
metrics or reports: `bench.serve` imports this module, never the other way round.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import dataclasses
import json
import math
import random
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

TOKEN_IDS = (1000, 40000)  # prompt ids are drawn from range(1000, 40000)


@dataclass(frozen=True)
class Workload:
    """What to send: request count, length ranges (inclusive), arrivals, concurrency cap."""

    num_requests: int
    prompt_len: tuple[int, int]  # the request's own tokens, after the shared prefix
    output_len: tuple[int, int]
    request_rate: float = math.inf  # requests per second, Poisson arrivals; inf: all at once
    max_concurrency: int | None = None  # requests in flight at most; 1: one at a time
    shared_prefix_len: int = 0  # tokens every prompt starts with
    seed: int = 0
    temperature: float = 0.0  # greedy, what the reference figures use; the others: a chat client's settings
    top_p: float | None = None
    top_k: int | None = None  # an extension of the API (ours, vLLM, SGLang)
    json_schema: dict[str, Any] | None = None  # every request's output constrained to it (response_format)
    # (width, height): each request a chat of one such image and prompt_len words (bench/image_requests.py)
    image_size: tuple[int, int] | None = None

    def sampling(self) -> dict[str, Any]:
        """The request body's sampling fields, and its constraint."""
        fields: dict[str, Any] = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}
        if self.json_schema is not None:
            fields["response_format"] = {
                "type": "json_schema", "json_schema": {"name": "bench", "strict": True, "schema": self.json_schema},
            }
        return {key: value for key, value in fields.items() if value is not None}

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["prompt_len"] = list(self.prompt_len)
        out["output_len"] = list(self.output_len)
        if self.image_size is not None:
            out["image_size"] = list(self.image_size)
        out["request_rate"] = "inf" if math.isinf(self.request_rate) else self.request_rate
        return out


# -- requests ------------------------------------------------------------------------------


@dataclass
class RequestSpec:
    prompt: list[int]
    output_len: int
    sampling: dict[str, Any] = field(default_factory=lambda: {"temperature": 0.0})
    messages: list[dict[str, Any]] | None = None  # a chat request (to /chat/completions) instead of `prompt`


def sample_lengths(rng: random.Random, bounds: tuple[int, int], n: int) -> list[int]:
    """`n` lengths uniform in [lo, hi], both ends included."""
    lo, hi = bounds
    return [rng.randint(lo, hi) for _ in range(n)]


def build_requests(workload: Workload) -> list[RequestSpec]:
    """The workload's prompts and output lengths; the same for the same workload and seed."""
    rng = random.Random(workload.seed)
    prefix = [rng.randrange(*TOKEN_IDS) for _ in range(workload.shared_prefix_len)]
    prompt_lens = sample_lengths(rng, workload.prompt_len, workload.num_requests)
    output_lens = sample_lengths(rng, workload.output_len, workload.num_requests)
    if workload.image_size is not None:
        from bench.image_requests import image_chat

        return [
            RequestSpec([], o, workload.sampling(), image_chat(rng, p, workload.image_size, workload.seed * 100_003 + i))
            for i, (p, o) in enumerate(zip(prompt_lens, output_lens, strict=True))
        ]
    return [
        RequestSpec(prefix + [rng.randrange(*TOKEN_IDS) for _ in range(p)], o, workload.sampling())
        for p, o in zip(prompt_lens, output_lens, strict=True)
    ]


def arrival_times(n: int, rate: float, seed: int = 0) -> list[float]:
    """Send times in seconds from the start: a Poisson process of `rate` requests per second
    (exponential gaps, the first request at 0), or all at 0 for an infinite rate."""
    if math.isinf(rate):
        return [0.0] * n
    if rate <= 0:
        raise ValueError("the request rate must be positive")
    rng = random.Random(seed + 1)  # not the prompts' stream: the rate does not change the prompts
    times, t = [], 0.0
    for _ in range(n):
        times.append(t)
        t += rng.expovariate(rate)
    return times


@dataclass
class RequestResult:
    prompt_len: int
    output_len: int  # asked for
    start: float = 0.0  # perf_counter when sent
    ok: bool = False
    error: str = ""
    ttft: float = 0.0  # seconds
    latency: float = 0.0
    output_tokens: int = 0
    chunk_times: list[float] = field(default_factory=list)  # text chunks' arrivals, from start
    cached_tokens: int | None = None
    text: str | None = None  # the output, kept for a constrained request (its answer is checked)

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:], strict=False)]


class SSEParser:
    """Splits a `text/event-stream` body into the data of its events, as bytes arrive."""

    def __init__(self) -> None:
        self._buffer = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span reads

    def feed(self, data: bytes | str) -> list[str]:
        text = self._decoder.decode(data) if isinstance(data, bytes) else data
        self._buffer += text.replace("\r\n", "\n").replace("\r", "\n")
        events = []
        while "\n\n" in self._buffer:
            block, self._buffer = self._buffer.split("\n\n", 1)
            lines = [line[5:].removeprefix(" ") for line in block.split("\n") if line.startswith("data:")]
            if lines:  # comment-only blocks (": ping") carry no data
                events.append("\n".join(lines))
        return events


def _error_text(body: str) -> str:
    try:
        error = json.loads(body).get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if error:
            return str(error)
    except (ValueError, AttributeError):
        pass
    return body.strip()[:500]


async def send_request(client: Any, url: str, model: str, spec: RequestSpec,
                       headers: dict[str, str] | None = None) -> RequestResult:
    """One streamed completion (or chat completion, for a spec with messages); every text
    chunk's arrival time is kept."""
    prompt = {"messages": spec.messages} if spec.messages is not None else {"prompt": spec.prompt}
    payload = {
        "model": model, **prompt, "max_tokens": spec.output_len, **spec.sampling,
        "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
    }
    result = RequestResult(prompt_len=len(spec.prompt), output_len=spec.output_len)
    texts: list[str] | None = [] if "response_format" in spec.sampling else None
    usage_tokens: int | None = None
    done = False
    result.start = start = time.perf_counter()
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {_error_text(body)}"
                return result
            parser = SSEParser()
            async for data in response.aiter_raw():
                now = time.perf_counter() - start
                for event in parser.feed(data):
                    if event == "[DONE]":
                        done = True
                        continue
                    chunk = json.loads(event)
                    if chunk.get("error"):
                        result.error = "error event: " + _error_text(event)
                        return result
                    choices = chunk.get("choices") or []
                    text = choices and (choices[0].get("text") or (choices[0].get("delta") or {}).get("content"))
                    if text:
                        result.chunk_times.append(now)
                        if texts is not None:
                            texts.append(text)
                    usage = chunk.get("usage")
                    if usage:
                        usage_tokens = usage.get("completion_tokens")
                        if spec.messages is not None:  # a chat's prompt, its image tokens included
                            result.prompt_len = int(usage.get("prompt_tokens") or 0)
                        details = usage.get("prompt_tokens_details") or {}
                        if details.get("cached_tokens") is not None:
                            result.cached_tokens = int(details["cached_tokens"])
    except Exception as e:  # a request that breaks is a failed request, reported with the others
        result.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        return result
    result.latency = time.perf_counter() - start
    if texts is not None:
        result.text = "".join(texts)
    if not done:
        result.error = "the stream ended without [DONE]"
    elif not result.chunk_times:
        result.error = "no chunk with text"
    else:
        result.ok = True
        result.ttft = result.chunk_times[0]
        result.output_tokens = int(usage_tokens) if usage_tokens is not None else len(result.chunk_times)
    return result


# -- running -------------------------------------------------------------------------------


def _raise_fd_limit(wanted: int) -> None:
    """Each request in flight holds a socket: lift the soft file limit towards the hard one."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):
        pass


def _client(timeout: float, max_connections: int | None, verify: Any = True) -> Any:
    import httpx

    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout, connect=min(timeout, 60.0)),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        headers={"Accept-Encoding": "identity"},
        verify=verify,
    )


# Requests in flight per httpx client: its connection pool scans every connection whenever a
# request starts or ends, which costs seconds of the client's time at a thousand connections.
_REQUESTS_PER_CLIENT = 16


async def run_workload(base_url: str, model: str, workload: Workload, *, timeout: float = 1800.0,
                       headers: dict[str, str] | None = None, progress: bool = True,
                       desc: str = "") -> tuple[list[RequestResult], float, float]:
    """Sends the workload's requests at their arrival times; returns the results in request
    order, the wall time from the first send to the last answer, and the first send's clock."""
    from tqdm import tqdm

    specs = build_requests(workload)
    arrivals = arrival_times(len(specs), workload.request_rate, workload.seed)
    cap = workload.max_concurrency
    _raise_fd_limit(2 * (cap or len(specs)) + 256)
    url = base_url.rstrip("/") + ("/chat/completions" if workload.image_size else "/completions")
    limit = asyncio.Semaphore(cap) if cap else None
    bar = tqdm(total=len(specs), desc=desc, unit="req", disable=not progress, dynamic_ncols=True)
    ssl_context = ssl.create_default_context()  # one for all clients: each would load the CA file
    count = max(1, math.ceil(min(cap or len(specs), len(specs)) / _REQUESTS_PER_CLIENT))
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(_client(timeout, None, ssl_context)) for _ in range(count)]
        if workload.request_rate == math.inf:
            await _open_connections(clients, base_url, min(cap or len(specs), len(specs)), headers)
        t0 = time.perf_counter()

        async def one(i: int) -> RequestResult:
            delay = t0 + arrivals[i] - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if limit is None:
                result = await send_request(clients[i % count], url, model, specs[i], headers)
            else:
                async with limit:  # latencies count from the send, not from the wait for a slot
                    result = await send_request(clients[i % count], url, model, specs[i], headers)
            bar.update(1)
            return result

        results = await asyncio.gather(*(one(i) for i in range(len(specs))))
        duration = time.perf_counter() - t0
    bar.close()
    return list(results), duration, t0


async def _open_connections(clients: list[Any], base_url: str, total: int, headers: dict[str, str] | None) -> None:
    """Open `total` keep-alive connections, spread over `clients`, before the clock starts.

    Requests sent all at once otherwise spend the client's first second connecting: each
    stage (name lookup in a thread, connect, send) runs for every request before the first
    request's next one, so no request reaches the server until all are connected. Opened
    here (one `GET /models` each, at once, per client), they are reused by the requests.
    """
    url = base_url.rstrip("/") + "/models"

    async def one(client: Any) -> None:
        response = await client.get(url, headers=headers)
        await response.aclose()

    per_client = -(-total // len(clients))
    # A server without /models: the requests connect as they go. Every GET ends before the clock.
    await asyncio.gather(*(one(c) for c in clients for _ in range(per_client)), return_exceptions=True)


async def _get_json(base_url: str, path: str, headers: dict[str, str] | None, timeout: float = 30.0) -> Any:
    async with _client(timeout, 4) as client:
        response = await client.get(base_url.rstrip("/") + path, headers=headers)
        response.raise_for_status()
        return response.json()


async def first_model(base_url: str, headers: dict[str, str] | None = None) -> str:
    data = await _get_json(base_url, "/models", headers)
    models = data.get("data") or []
    if not models:
        raise RuntimeError(f"{base_url}/models lists no model")
    return str(models[0]["id"])


async def server_info(base_url: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """What the server tells about itself, best effort: lightgate's KV capacity from /metrics."""
    info: dict[str, Any] = {}
    root = base_url.rstrip("/").removesuffix("/v1")
    try:
        async with _client(10.0, 2) as client:
            text = (await client.get(root + "/metrics", headers=headers)).text
        for line in text.splitlines():
            if line.startswith("lightgate:kv_cache_capacity_tokens"):
                info["kv_cache_capacity_tokens"] = int(float(line.rsplit(" ", 1)[1]))
                break
    except Exception:  # other servers, or none at that root: nothing to tell
        pass
    return info


async def warm_up(base_url: str, model: str, workload: Workload, count: int,
                  headers: dict[str, str] | None) -> None:
    """`count` short requests (own random prompts, no shared prefix; own images for an image
    workload) before measuring."""
    rng = random.Random(workload.seed + 10_007)
    path = "/chat/completions" if workload.image_size else "/completions"
    async with _client(600.0, 4) as client:
        for k in range(count):
            spec = RequestSpec([rng.randrange(*TOKEN_IDS) for _ in range(workload.prompt_len[0])],
                               min(16, workload.output_len[1]), workload.sampling())
            if workload.image_size is not None:
                from bench.image_requests import image_chat

                spec.messages = image_chat(rng, workload.prompt_len[0], workload.image_size, seed=-1 - k)
            result = await send_request(client, base_url.rstrip("/") + path, model, spec, headers)
            if not result.ok:
                raise RuntimeError(f"the warm-up request failed: {result.error}")
