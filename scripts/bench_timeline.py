"""A workload's timeline from a `lightgate bench serve --json` result file: when the requests
were sent, when first tokens came, and the output rate and the requests decoding over time.

    python scripts/bench_timeline.py results.json [--workload offline1000] [--bucket 2]

Each request's result line holds its send time, TTFT and latency (ms from the run's start);
its output tokens are spread evenly between its first token and its end, so a bucket's rate
is an estimate, exact over the whole run. It shows where an all-at-once run loses time: a late
first token (the client, or the server's start), the prefill ramp, the steady state, the drain.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter


def timeline(requests: list[dict], duration_ms: float, bucket_s: float) -> list[str]:
    ok = [r for r in requests if r.get("error") is None and r.get("ttft_ms") is not None]
    sends = sorted(r["start_ms"] for r in ok)
    firsts = sorted(r["start_ms"] + r["ttft_ms"] for r in ok)
    ends = sorted(r["start_ms"] + r["latency_ms"] for r in ok)

    def nth(values: list[float], k: int) -> str:
        return f"{values[min(k, len(values)) - 1]:.0f}"

    lines = [
        f"{len(ok)} requests in {duration_ms:.0f} ms; sent {sends[0]:.0f}..{sends[-1]:.0f} ms",
        f"first tokens at (ms): 1st {firsts[0]:.0f}, " + ", ".join(f"{k}th {nth(firsts, k)}" for k in (10, 100, 512)) + f", last {firsts[-1]:.0f}",
        "ends at (ms): 1st " + f"{ends[0]:.0f}, " + ", ".join(f"{k}th {nth(ends, k)}" for k in (100, 500, 900)) + f", last {ends[-1]:.0f}",
    ]
    width = bucket_s * 1e3
    tokens: Counter[int] = Counter()
    for r in ok:
        t0, t1, n = r["start_ms"] + r["ttft_ms"], r["start_ms"] + r["latency_ms"], r["output_tokens"]
        for i in range(n):
            tokens[int((t0 + (t1 - t0) * i / max(n - 1, 1)) // width)] += 1
    count = int(duration_ms // width) + 1
    lines.append(f"output tok/s per {bucket_s:g} s: " + " ".join(f"{tokens[i] / bucket_s:.0f}" for i in range(count)))
    decoding = [
        sum(1 for r in ok if r["start_ms"] + r["ttft_ms"] <= i * width < r["start_ms"] + r["latency_ms"])
        for i in range(count)
    ]
    lines.append(f"decoding at each {bucket_s:g} s mark: " + " ".join(map(str, decoding)))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="result files of `lightgate bench serve --json`")
    parser.add_argument("--workload", default="offline1000")
    parser.add_argument("--bucket", type=float, default=2.0, help="seconds per bucket")
    args = parser.parse_args()
    for path in args.results:
        with open(path) as f:
            runs = json.load(f)["runs"]
        for run in runs:
            workload = run["workloads"].get(args.workload)
            if workload is None:
                continue
            print(f"== {path}: {run['label']}, {args.workload}")
            for line in timeline(workload["requests"], 1e3 * workload["metrics"]["duration_s"], args.bucket):
                print("  " + line)


if __name__ == "__main__":
    main()
