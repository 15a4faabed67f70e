"""`lightgate bench serve`: a benchmark client for any OpenAI-compatible server.

    lightgate bench serve --workload online8rps --base-url http://127.0.0.1:8000/v1 --json r.json
    lightgate bench serve --workload bs1 offline1000 --label int8 --json int8.json --plot int8.png
    lightgate bench serve --num-requests 64 --prompt-len 32:256 --output-len 32:128 --max-concurrency 16
    lightgate bench serve --from-json bf16.json int8.json --compare-lightllm --plot both.png

Requests go to `/v1/completions` with random token-id prompts (ids uniform in 1000..40000,
lengths uniform in the given ranges, fixed seed), streaming, greedy, `ignore_eos`, so the
same workload costs the same on every server (ours, vLLM, LightLLM); `--temperature`,
`--top-p` and `--top-k` sample instead, as chat clients do. `--json-schema FILE` constrains
every request's output to that JSON schema (`response_format`, strict): with `ignore_eos` an
answer still runs to its max_tokens (once its JSON is complete only the end token may come, and
its text is empty), so pick a schema whose answers are longer than the workload's outputs
(bench/schemas/catalog.json: at least 40 products) and every token is sampled under a live
grammar; the run reports how many answers closed their JSON (and validate), and the share of
output tokens that carried text (`structured`). Each request's chunks
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
import dataclasses
import json
import math
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

from bench.http_client import RequestResult, Workload, first_model, run_workload, server_info, warm_up
from bench.report import QUANTILES, fmt, load_runs, report, write_json

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"

# The workloads of BENCHMARKS.md.
WORKLOADS: dict[str, Workload] = {
    "bs1": Workload(4, (512, 512), (256, 256), max_concurrency=1),
    "offline1000": Workload(1000, (128, 1024), (64, 512)),
    "online8rps": Workload(300, (128, 1024), (64, 512), request_rate=8.0),
    "long2k": Workload(400, (2048, 3500), (128, 512)),
    "prefix16rps": Workload(300, (64, 256), (64, 128), request_rate=16.0, shared_prefix_len=1536),
    "cpu1": Workload(4, (128, 128), (128, 128), max_concurrency=1),
    "cpu16": Workload(64, (32, 256), (32, 128), max_concurrency=16),
    # vision-language models: a chat of one 1024 x 768 image and 16-48 words per request
    "image4rps": Workload(200, (16, 48), (128, 128), request_rate=4.0, image_size=(1024, 768)),
    "image200": Workload(200, (16, 48), (128, 128), image_size=(1024, 768)),
}


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


def structured_metrics(results: Sequence[RequestResult], schema: dict[str, Any]) -> dict[str, Any]:
    """What the constrained answers were: how many closed their JSON (and validate against
    `schema`), and the share of output tokens that carried text. Under `ignore_eos`, a token after
    a closed JSON is an end token without text, so that share is the share of tokens sampled while
    the grammar was open (a token cut inside a character has none either: a few)."""
    import jsonschema  # type: ignore[import-untyped]

    ok = [r for r in results if r.ok]
    closed = valid = 0
    for r in ok:
        try:
            answer = json.loads(r.text or "")
        except ValueError:
            continue
        closed += 1
        valid += jsonschema.Draft202012Validator(schema).is_valid(answer)
    output_tokens = sum(r.output_tokens for r in ok)
    with_text = sum(len(r.chunk_times) for r in ok)
    return {"closed": closed, "valid": valid, "text_token_share": with_text / max(output_tokens, 1)}


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


def _json_file(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"{path}: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{path}: a JSON schema is an object")
    return value


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
    parser.add_argument("--temperature", type=float, default=None,
                        help="sampling temperature of every request (default 0: greedy, as the reference figures)")
    parser.add_argument("--top-p", type=float, default=None, help="top_p of every request")
    parser.add_argument("--top-k", type=int, default=None, help="top_k of every request (an API extension)")
    parser.add_argument("--json-schema", type=_json_file, default=None, metavar="FILE",
                        help="constrain every request's output to this JSON schema (e.g. bench/schemas/catalog.json)")
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
                 "shared_prefix_len", "seed", "temperature", "top_p", "top_k", "json_schema"):
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
        if workload.json_schema is not None:
            metrics["structured"] = structured_metrics(results, workload.json_schema)
        run["workloads"][name] = {
            "config": workload.to_json(), "metrics": metrics, "distributions": distributions(results),
            "requests": request_rows(results, t0),
        }
        m = metrics
        print(f"{name}: {m['completed']}/{len(results)} ok in {duration:.1f} s, "
              f"{m['output_throughput']:.1f} output tok/s, TTFT p50 {fmt(m['ttft_ms']['p50'])} ms, "
              f"TPOT p50 {fmt(m['tpot_ms']['p50'])} ms", flush=True)
        if "structured" in m:
            st = m["structured"]
            print(f"{name}: json_schema: {st['closed']} answers closed their JSON ({st['valid']} valid), "
                  f"{100 * st['text_token_share']:.1f} % of output tokens carried text", flush=True)
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
