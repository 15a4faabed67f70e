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
import platform
import random
import ssl
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.bench_report import QUANTILES, fmt, load_runs, report, write_json

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
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
              f"{m['output_throughput']:.1f} output tok/s, TTFT p50 {fmt(m['ttft_ms']['p50'])} ms, "
              f"TPOT p50 {fmt(m['tpot_ms']['p50'])} ms", flush=True)
        if m["client_cpu_fraction"] > 0.8:
            print(f"warning: the client used {100 * m['client_cpu_fraction']:.0f} % of a core; "
                  "its own delays may show in the latencies", file=sys.stderr)
        if args.json:
            write_json(args.json, [run])  # after each workload: a run cut short keeps what it did
    return run


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_json:
        runs = load_runs(args.from_json)
    else:
        workloads = workloads_from_args(args)
        try:
            runs = [_run_loop(_bench(args, workloads))]
        except Exception as e:
            print(f"lightgate bench serve: {args.base_url}: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
    report(runs, compare_lightllm=args.compare_lightllm, json_path=args.json, plot_path=args.plot)
    failed = sum(w["metrics"]["failed"] for run in runs for w in run["workloads"].values())
    return 1 if failed and not args.from_json else 0


if __name__ == "__main__":
    sys.exit(main())
