"""Reports of `lightgate bench serve` runs: the table, the CDF plot, result files, LightLLM's figures.

A run is the plain dict the client builds (its label, the server, and per workload its config,
metrics, quantiles of TTFT/TPOT/ITL and one line per request), and a result file holds
{"runs": [run, ...]}. Everything here reads only such dicts, never the client's requests, so
runs read back with `--from-json` (merged across files) are reported, plotted and set beside
LightLLM's H100 figures of BENCHMARKS.md (`--compare-lightllm`) exactly as a fresh run is,
without sending a request. The client imports this module, never the other way round.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

QUANTILES = [q / 2 for q in range(201)]  # 0, 0.5, ..., 100: the distributions kept for plots


def fmt(value: float | None) -> str:
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
                return f"{fmt(m[key]['p50'])} / {fmt(m[key]['p99'])}"

            lines.append(
                f"{str(run.get('label') or '-'):<{lw}}{name[:12]:<13}{m['completed']:>6}/{sent:<3}"
                f"{m['duration_s']:>8.1f}{m['request_throughput']:>8.2f}{fmt(m['output_throughput']):>11}"
                f"{fmt(m['total_token_throughput']):>11}{pair('ttft_ms'):>18}{pair('tpot_ms'):>18}"
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
            cells.append(fmt(value))
        lines.append(f"{workload:<13}{row:<24}" + "".join(f"{c:>{width}}" for c in cells)
                     + f"{fmt(bf16):>15}{fmt(int8):>15}{target:>10}")
    if len(lines) == 2:
        return ""
    kv = [run.get("server", {}).get("kv_cache_capacity_tokens") for run in runs]
    if any(v is not None for v in kv):
        lines.append(f"{'server':<13}{'KV capacity tokens':<24}" + "".join(f"{fmt(v):>{width}}" for v in kv)
                     + f"{fmt(LIGHTLLM_KV_TOKENS[0]):>15}{fmt(LIGHTLLM_KV_TOKENS[1]):>15}{'1.9x bf16':>10}")
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
                m = w["metrics"][key]
                label = f"{run.get('label') or f'run {i}'} (p50 {fmt(m['p50'])}, p99 {fmt(m['p99'])})"
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


def load_runs(paths: Iterable[str]) -> list[dict[str, Any]]:
    """The runs of these result files, merged (`--from-json`)."""
    loaded = []
    for path in paths:
        with open(path) as f:
            loaded.append(json.load(f))
    return merge_runs(loaded)


def report(runs: Sequence[dict[str, Any]], *, compare_lightllm: bool = False, json_path: str | None = None,
           plot_path: str | None = None) -> None:
    """Prints the table (and the LightLLM comparison), then writes the result file and the plot."""
    print()
    print(format_table(runs))
    if compare_lightllm:
        print()
        print(format_reference_table(runs) or "(none of the workloads has LightLLM figures)")
    if json_path:
        write_json(json_path, runs)
    if plot_path:
        plot(runs, plot_path)
