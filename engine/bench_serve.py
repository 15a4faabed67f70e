"""`lightgate bench serve`: a benchmark client for any OpenAI-compatible server.

    lightgate bench serve --workload online8rps --base-url http://127.0.0.1:8000/v1 --json r.json
    lightgate bench serve --workload bs1 offline1000 --label int8 --json int8.json --plot int8.png
    lightgate bench serve --num-requests 64 --prompt-len 32:256 --output-len 32:128 --max-concurrency 16
    lightgate bench serve --from-json bf16.json int8.json --compare-lightllm --plot both.png

Requests go to `/v1/completions` with random token-id prompts (ids uniform in 1000..40000,
lengths uniform in the given ranges, fixed seed), streaming, greedy, `ignore_eos`, so the
same workload costs the same on every server (ours, vLLM, LightLLM). Each request's chunks
are timed as they arrive, and the metrics follow vLLM's and SGLang's serving benchmarks:
TTFT = time to the first chunk with text; TPOT = (latency - TTFT) / (output tokens - 1);
ITL = the gaps between text chunks; throughputs = tokens / wall time of the whole run.
Output tokens come from the final usage chunk, or count the text chunks when a server sends
none. Failed requests are counted and reported, never dropped.

Result files hold {"runs": [run, ...]}, one run per invocation (its `label`, the server, and
per workload its config, metrics, quantiles of TTFT/TPOT/ITL and one line per request);
`--from-json` reads such files back, merges them and reports, plots or compares them with
LightLLM's figures from BENCHMARKS.md without sending a request.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import dataclasses
import json
import math
import os
import platform
import random
import ssl
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
TOKEN_IDS = (1000, 40000)  # prompt ids are drawn from range(1000, 40000)
QUANTILES = [q / 2 for q in range(201)]  # 0, 0.5, ..., 100: the distributions kept for plots


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

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["prompt_len"] = list(self.prompt_len)
        out["output_len"] = list(self.output_len)
        out["request_rate"] = "inf" if math.isinf(self.request_rate) else self.request_rate
        return out


# The workloads of BENCHMARKS.md.
WORKLOADS: dict[str, Workload] = {
    "bs1": Workload(4, (512, 512), (256, 256), max_concurrency=1),
    "offline1000": Workload(1000, (128, 1024), (64, 512)),
    "online8rps": Workload(300, (128, 1024), (64, 512), request_rate=8.0),
    "long2k": Workload(400, (2048, 3500), (128, 512)),
    "prefix16rps": Workload(300, (64, 256), (64, 128), request_rate=16.0, shared_prefix_len=1536),
    "cpu1": Workload(4, (128, 128), (128, 128), max_concurrency=1),
    "cpu16": Workload(64, (32, 256), (32, 128), max_concurrency=16),
}


# -- requests ------------------------------------------------------------------------------


@dataclass
class RequestSpec:
    prompt: list[int]
    output_len: int


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
    return [
        RequestSpec(prefix + [rng.randrange(*TOKEN_IDS) for _ in range(p)], o)
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
    """One streamed completion; every text chunk's arrival time is kept."""
    payload = {
        "model": model, "prompt": spec.prompt, "max_tokens": spec.output_len, "temperature": 0.0,
        "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
    }
    result = RequestResult(prompt_len=len(spec.prompt), output_len=spec.output_len)
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
                    if choices and choices[0].get("text"):
                        result.chunk_times.append(now)
                    usage = chunk.get("usage")
                    if usage:
                        usage_tokens = usage.get("completion_tokens")
                        details = usage.get("prompt_tokens_details") or {}
                        if details.get("cached_tokens") is not None:
                            result.cached_tokens = int(details["cached_tokens"])
    except Exception as e:  # a request that breaks is a failed request, reported with the others
        result.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        return result
    result.latency = time.perf_counter() - start
    if not done:
        result.error = "the stream ended without [DONE]"
    elif not result.chunk_times:
        result.error = "no chunk with text"
    else:
        result.ok = True
        result.ttft = result.chunk_times[0]
        result.output_tokens = int(usage_tokens) if usage_tokens is not None else len(result.chunk_times)
    return result


# -- metrics -------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), interpolating linearly between ranks, as numpy's default."""
    if not values:
        raise ValueError("no values")
    return _percentile_sorted(sorted(values), q)


def _percentile_sorted(ordered: Sequence[float], q: float) -> float:
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(values: Sequence[float], scale: float = 1e3) -> dict[str, float | None]:
    """mean, p50, p90, p99, min, max of seconds, in milliseconds (None for no values)."""
    if not values:
        return dict.fromkeys(("mean", "p50", "p90", "p99", "min", "max"))
    ordered = sorted(values)
    return {
        "mean": scale * sum(ordered) / len(ordered),
        "p50": scale * _percentile_sorted(ordered, 50),
        "p90": scale * _percentile_sorted(ordered, 90),
        "p99": scale * _percentile_sorted(ordered, 99),
        "min": scale * ordered[0],
        "max": scale * ordered[-1],
    }


def compute_metrics(results: Sequence[RequestResult], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    input_tokens = sum(r.prompt_len for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    cached = [r.cached_tokens for r in ok if r.cached_tokens is not None]
    tpots = [t for t in (r.tpot for r in ok) if t is not None]
    wall = max(duration, 1e-9)
    return {
        "completed": len(ok),
        "failed": len(failed),
        "first_error": failed[0].error if failed else None,
        "duration_s": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "requested_output_tokens": sum(r.output_len for r in ok),
        "cached_prompt_tokens": sum(cached) if cached else None,
        "request_throughput": len(ok) / wall,
        "output_throughput": output_tokens / wall,
        "total_token_throughput": (input_tokens + output_tokens) / wall,
        "ttft_ms": summarize([r.ttft for r in ok]),
        "tpot_ms": summarize(tpots),
        "itl_ms": summarize([gap for r in ok for gap in r.itls]),
        "e2el_ms": summarize([r.latency for r in ok]),
    }


def distributions(results: Sequence[RequestResult]) -> dict[str, list[float]]:
    """Quantiles (QUANTILES, in ms) of TTFT, TPOT and ITL: enough to draw their CDFs later."""
    ok = [r for r in results if r.ok]
    series = {
        "ttft_ms": [r.ttft for r in ok],
        "tpot_ms": [t for t in (r.tpot for r in ok) if t is not None],
        "itl_ms": [gap for r in ok for gap in r.itls],
    }
    out = {}
    for name, values in series.items():
        ordered = sorted(values)
        out[name] = [round(1e3 * _percentile_sorted(ordered, q), 4) for q in QUANTILES] if ordered else []
    return out


def request_rows(results: Sequence[RequestResult], t0: float) -> list[dict[str, Any]]:
    def ms(x: float | None) -> float | None:
        return None if x is None else round(1e3 * x, 3)

    return [
        {
            "prompt_len": r.prompt_len, "output_len": r.output_len, "output_tokens": r.output_tokens,
            "start_ms": ms(r.start - t0), "ttft_ms": ms(r.ttft) if r.ok else None,
            "latency_ms": ms(r.latency) if r.ok else None, "tpot_ms": ms(r.tpot),
            "cached_tokens": r.cached_tokens, "error": r.error or None,
        }
        for r in results
    ]


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
    url = base_url.rstrip("/") + "/completions"
    limit = asyncio.Semaphore(cap) if cap else None
    bar = tqdm(total=len(specs), desc=desc, unit="req", disable=not progress, dynamic_ncols=True)
    ssl_context = ssl.create_default_context()  # one for all clients: each would load the CA file
    count = max(1, math.ceil(min(cap or len(specs), len(specs)) / _REQUESTS_PER_CLIENT))
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(_client(timeout, None, ssl_context)) for _ in range(count)]
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
    """`count` short requests (own random prompts, no shared prefix) before measuring."""
    rng = random.Random(workload.seed + 10_007)
    async with _client(600.0, 4) as client:
        for _ in range(count):
            spec = RequestSpec([rng.randrange(*TOKEN_IDS) for _ in range(workload.prompt_len[0])],
                               min(16, workload.output_len[1]))
            result = await send_request(client, base_url.rstrip("/") + "/completions", model, spec, headers)
            if not result.ok:
                raise RuntimeError(f"the warm-up request failed: {result.error}")


def _run_loop(coro: Any) -> Any:
    try:
        import uvloop  # a faster event loop where there is one: the client's own cost shows in ITL
    except ImportError:
        return asyncio.run(coro)
    if hasattr(uvloop, "run"):
        return uvloop.run(coro)
    uvloop.install()
    return asyncio.run(coro)


# -- reports -------------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    """Three or more significant digits: 7.25, 98.0, 210, 6 992."""
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}".replace(",", " ")
    return f"{value:.{0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2}f}"


def format_table(runs: Sequence[dict[str, Any]]) -> str:
    lw = max([6, *(len(str(run.get("label") or "-")) + 2 for run in runs)])
    head = (f"{'label':<{lw}}{'workload':<13}{'ok/sent':>10}{'wall s':>8}{'req/s':>8}{'out tok/s':>11}"
            f"{'tot tok/s':>11}{'TTFT p50/p99 ms':>18}{'TPOT p50/p99 ms':>18}{'ITL p50/p99 ms':>17}")
    lines = [head, "-" * len(head)]
    errors = []
    for run in runs:
        for name, w in run["workloads"].items():
            m = w["metrics"]
            sent = m["completed"] + m["failed"]

            def pair(key: str, m: dict[str, Any] = m) -> str:
                return f"{_fmt(m[key]['p50'])} / {_fmt(m[key]['p99'])}"

            lines.append(
                f"{str(run.get('label') or '-'):<{lw}}{name[:12]:<13}{m['completed']:>6}/{sent:<3}"
                f"{m['duration_s']:>8.1f}{m['request_throughput']:>8.2f}{_fmt(m['output_throughput']):>11}"
                f"{_fmt(m['total_token_throughput']):>11}{pair('ttft_ms'):>18}{pair('tpot_ms'):>18}"
                f"{pair('itl_ms'):>17}"
            )
            if m["failed"]:
                errors.append(f"{run.get('label') or '-'} {name}: {m['failed']} failed, first: {m['first_error']}")
    return "\n".join(lines + errors)


# LightLLM v1.2.0 on one H100, the 8B-shaped random model (BENCHMARKS.md): workload, row,
# metric, statistic, bf16 KV, int8 KV, lightgate's target; `cache`: the prefix cache state the
# row is about (prefix16rps), None for every state.
LIGHTLLM_REFERENCE: list[tuple[str, str, str, str | None, float | None, float | None, str, bool | None]] = [
    ("bs1", "TPOT p50 ms", "tpot_ms", "p50", 7.25, 7.38, "<= 5.5", None),
    ("bs1", "TTFT p50 ms (512 tok)", "ttft_ms", "p50", 108, 113, "", None),
    ("offline1000", "output tok/s", "output_throughput", None, 6992, 7070, ">= 9090", None),
    ("offline1000", "total tok/s", "total_token_throughput", None, 20687, 20916, "", None),
    ("online8rps", "TTFT p50 ms", "ttft_ms", "p50", 87, 83, "<= 40", None),
    ("online8rps", "TTFT p99 ms", "ttft_ms", "p99", 210, 204, "", None),
    ("online8rps", "TPOT p50 ms", "tpot_ms", "p50", 10.5, 10.8, "", None),
    ("online8rps", "TPOT p99 ms", "tpot_ms", "p99", 12.7, 13.4, "<= 11", None),
    ("long2k", "output tok/s", "output_throughput", None, 2234, 2386, "", None),
    ("long2k", "total tok/s", "total_token_throughput", None, 21782, 23264, "", None),
    ("prefix16rps", "TTFT p50 ms, cache on", "ttft_ms", "p50", 98, None, "<= 30", True),
    ("prefix16rps", "TTFT p99 ms, cache on", "ttft_ms", "p99", 1010, None, "<= 150", True),
    ("prefix16rps", "TPOT p50 ms, cache on", "tpot_ms", "p50", 14.3, None, "", True),
    ("prefix16rps", "TPOT p99 ms, cache on", "tpot_ms", "p99", 32.5, None, "", True),
    ("prefix16rps", "TTFT p50 ms, cache off", "ttft_ms", "p50", 131, None, "", False),
    ("prefix16rps", "TTFT p99 ms, cache off", "ttft_ms", "p99", 275, None, "", False),
    ("prefix16rps", "TPOT p50 ms, cache off", "tpot_ms", "p50", 24.3, None, "", False),
    ("prefix16rps", "TPOT p99 ms, cache off", "tpot_ms", "p99", 45.5, None, "", False),
]
LIGHTLLM_KV_TOKENS = (396_242, 633_988)


def _prefix_cache_on(workload: dict[str, Any]) -> bool:
    """Whether the server reused the shared prefix: cached tokens reported and non-zero
    (a server that reports none is taken to have its cache on, the usual default)."""
    cached = workload["metrics"].get("cached_prompt_tokens")
    return cached is None or cached > 0


def format_reference_table(runs: Sequence[dict[str, Any]]) -> str:
    """The runs beside LightLLM's figures, one row per figure of BENCHMARKS.md ("" when the
    runs have none of its workloads)."""
    labels = [str(run.get("label") or f"run {i}") for i, run in enumerate(runs)]
    width = max([12, *(len(label) + 2 for label in labels)])
    head = f"{'workload':<13}{'metric':<24}" + "".join(f"{label:>{width}}" for label in labels)
    head += f"{'LightLLM bf16':>15}{'LightLLM int8':>15}{'target':>10}"
    lines = [head, "-" * len(head)]
    present = {name for run in runs for name in run["workloads"]}
    for workload, row, key, stat, bf16, int8, target, cache in LIGHTLLM_REFERENCE:
        if workload not in present:
            continue
        cells = []
        for run in runs:
            w = run["workloads"].get(workload)
            if w is None or (cache is not None and _prefix_cache_on(w) != cache):
                cells.append("-")
                continue
            value = w["metrics"][key] if stat is None else w["metrics"][key][stat]
            cells.append(_fmt(value))
        lines.append(f"{workload:<13}{row:<24}" + "".join(f"{c:>{width}}" for c in cells)
                     + f"{_fmt(bf16):>15}{_fmt(int8):>15}{target:>10}")
    if len(lines) == 2:
        return ""
    kv = [run.get("server", {}).get("kv_cache_capacity_tokens") for run in runs]
    if any(v is not None for v in kv):
        lines.append(f"{'server':<13}{'KV capacity tokens':<24}" + "".join(f"{_fmt(v):>{width}}" for v in kv)
                     + f"{_fmt(LIGHTLLM_KV_TOKENS[0]):>15}{_fmt(LIGHTLLM_KV_TOKENS[1]):>15}{'1.9x bf16':>10}")
    failed = [(label, name, w["metrics"]["failed"]) for label, run in zip(labels, runs, strict=True)
              for name, w in run["workloads"].items() if w["metrics"]["failed"]]
    for label, name, n in failed:
        lines.append(f"note: {label} {name}: {n} requests failed")
    return "\n".join(lines)


def plot(runs: Sequence[dict[str, Any]], path: str) -> bool:
    """CDFs of TTFT, TPOT and ITL, one row per workload, one line per run; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'lightgate[bench]')", file=sys.stderr)
        return False
    names: list[str] = []
    for run in runs:
        names += [name for name in run["workloads"] if name not in names]
    if not names:
        return False
    columns = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"))
    fig, axes = plt.subplots(len(names), 3, figsize=(15, 3.2 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        for col, (key, title) in enumerate(columns):
            ax = axes[row][col]
            for i, run in enumerate(runs):
                w = run["workloads"].get(name)
                values = (w or {}).get("distributions", {}).get(key) or []
                if not values:
                    continue
                m = w["metrics"][key]  # type: ignore[index]
                label = f"{run.get('label') or f'run {i}'} (p50 {_fmt(m['p50'])}, p99 {_fmt(m['p99'])})"
                ax.plot(values, [q / 100 for q in QUANTILES], drawstyle="steps-post", label=label)
            ax.set_title(f"{name}: {title}")
            ax.set_xlabel("ms")
            shown = [x for line in ax.lines for x in line.get_xdata()]
            if shown and min(shown) > 0 and max(shown) > 20 * min(shown):  # long tails: log scale
                ax.set_xscale("log")
                ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
                ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            ax.set_ylim(0, 1)
            ax.set_ylabel("fraction of requests" if key != "itl_ms" else "fraction of gaps")
            ax.grid(True, alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def merge_runs(files: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs of several result files; runs of one label, server and model become one."""
    merged: list[dict[str, Any]] = []
    for data in files:
        for run in data.get("runs", []):
            key = (run.get("label"), run.get("base_url"), run.get("model"))
            same = next((m for m in merged if (m.get("label"), m.get("base_url"), m.get("model")) == key), None)
            if same is None:
                merged.append({**run, "workloads": dict(run["workloads"])})
            else:
                same["workloads"].update(run["workloads"])
                same["server"] = {**same.get("server", {}), **run.get("server", {})}
    return merged


def write_json(path: str, runs: Sequence[dict[str, Any]]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"runs": list(runs)}, f, indent=1)
    os.replace(tmp, path)  # a run killed while writing leaves the previous file whole


# -- command line --------------------------------------------------------------------------


def _length_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    bounds = (int(lo), int(hi or lo))
    if bounds[0] < 1 or bounds[1] < bounds[0]:
        raise argparse.ArgumentTypeError(f"want MIN:MAX with 1 <= MIN <= MAX, got {text!r}")
    return bounds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightgate bench serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", nargs="+", default=None, metavar="NAME",
                        help=f"presets, run in order (commas work too): {', '.join(WORKLOADS)}")
    parser.add_argument("--num-requests", type=int, default=None)
    parser.add_argument("--prompt-len", type=_length_range, default=None, metavar="MIN:MAX",
                        help="prompt tokens (after the shared prefix), uniform")
    parser.add_argument("--output-len", type=_length_range, default=None, metavar="MIN:MAX",
                        help="output tokens (max_tokens, eos ignored), uniform")
    parser.add_argument("--request-rate", type=float, default=None,
                        help="requests per second, Poisson arrivals; inf: all at once")
    parser.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    parser.add_argument("--shared-prefix-len", type=int, default=None, help="tokens every prompt starts with")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--sequential", action="store_true", help="one request at a time")
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL, help=f"the server's /v1 URL (default {DEFAULT_BASE_URL})")
    parser.add_argument("--model", default=None, help="model name (default: the first of GET /v1/models)")
    parser.add_argument("--api-key", default=None, help="bearer token, when the server wants one")
    parser.add_argument("--warmup", type=int, default=1, help="short requests sent before measuring (default 1)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds a request may stay silent")
    parser.add_argument("--label", default=None, help="a name for this run, saved in the JSON")
    parser.add_argument("--json", default=None, metavar="PATH", help="write every metric and the config here")
    parser.add_argument("--plot", default=None, metavar="PATH.png", help="TTFT / TPOT / ITL distributions")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--from-json", nargs="+", default=None, metavar="PATH",
                        help="send nothing: report (and --plot, --json) the runs in these result files")
    parser.add_argument("--compare-lightllm", action="store_true",
                        help="also print the runs beside LightLLM's H100 figures of BENCHMARKS.md")
    return parser


def workloads_from_args(args: argparse.Namespace) -> dict[str, Workload]:
    """The presets asked for (or one `custom` workload), with the explicit flags on top."""
    overrides: dict[str, Any] = {}
    for name in ("num_requests", "prompt_len", "output_len", "request_rate", "max_concurrency",
                 "shared_prefix_len", "seed"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.sequential:
        overrides["max_concurrency"] = 1
        overrides.setdefault("request_rate", math.inf)
    names = [n for item in (args.workload or []) for n in item.split(",") if n]
    if not names:
        missing = [flag for flag, key in (("--num-requests", "num_requests"), ("--prompt-len", "prompt_len"),
                                          ("--output-len", "output_len")) if key not in overrides]
        if missing:
            raise SystemExit(f"lightgate bench serve: give --workload, or {', '.join(missing)}")
        return {"custom": Workload(**overrides)}
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        raise SystemExit(f"lightgate bench serve: unknown workload {', '.join(unknown)} (known: {', '.join(WORKLOADS)})")
    return {name: dataclasses.replace(WORKLOADS[name], **overrides) for name in names}


async def _bench(args: argparse.Namespace, workloads: dict[str, Workload]) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    model = args.model or await first_model(args.base_url, headers)
    run: dict[str, Any] = {
        "label": args.label, "base_url": args.base_url, "model": model,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "client": {"python": platform.python_version(), "host": platform.node(),
                   "event_loop": type(asyncio.get_running_loop()).__module__.split(".")[0]},
        "server": await server_info(args.base_url, headers),
        "workloads": {},
    }
    first = next(iter(workloads.values()))
    if args.warmup > 0:
        await warm_up(args.base_url, model, first, args.warmup, headers)
    for name, workload in workloads.items():
        cpu0 = time.process_time()
        results, duration, t0 = await run_workload(
            args.base_url, model, workload, timeout=args.timeout, headers=headers,
            progress=not args.no_progress, desc=name,
        )
        cpu = time.process_time() - cpu0
        metrics = compute_metrics(results, duration)
        metrics["client_cpu_fraction"] = cpu / max(duration, 1e-9)
        run["workloads"][name] = {
            "config": workload.to_json(), "metrics": metrics, "distributions": distributions(results),
            "requests": request_rows(results, t0),
        }
        m = metrics
        print(f"{name}: {m['completed']}/{len(results)} ok in {duration:.1f} s, "
              f"{m['output_throughput']:.1f} output tok/s, TTFT p50 {_fmt(m['ttft_ms']['p50'])} ms, "
              f"TPOT p50 {_fmt(m['tpot_ms']['p50'])} ms", flush=True)
        if m["client_cpu_fraction"] > 0.8:
            print(f"warning: the client used {100 * m['client_cpu_fraction']:.0f} % of a core; "
                  "its own delays may show in the latencies", file=sys.stderr)
        if args.json:
            write_json(args.json, [run])  # after each workload: a run cut short keeps what it did
    return run


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_json:
        loaded = []
        for path in args.from_json:
            with open(path) as f:
                loaded.append(json.load(f))
        runs = merge_runs(loaded)
    else:
        workloads = workloads_from_args(args)
        try:
            runs = [_run_loop(_bench(args, workloads))]
        except Exception as e:
            print(f"lightgate bench serve: {args.base_url}: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
    print()
    print(format_table(runs))
    if args.compare_lightllm:
        print()
        print(format_reference_table(runs) or "(none of the workloads has LightLLM figures)")
    if args.json:
        write_json(args.json, runs)
    if args.plot:
        plot(runs, args.plot)
    failed = sum(w["metrics"]["failed"] for run in runs for w in run["workloads"].values())
    return 1 if failed and not args.from_json else 0


if __name__ == "__main__":
    sys.exit(main())
