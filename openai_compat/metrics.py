"""Prometheus metrics under the names vLLM dashboards know, prefixed `lightgate:`.

Per-request numbers (tokens, latencies, finish reasons) are recorded as responses are
produced, through one `RequestRecorder` per engine request; the two series updated for every
token (generated tokens, inter-token latency) are counted in plain numbers and exposed by a
collector. Engine-wide gauges and the prefix-cache counters are read from `engine.stats()`
when `/metrics` is scraped.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from engine import EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                240.0, 480.0, 960.0, 1920.0, 7680.0)

StatsFn = Callable[[], "EngineStats | None"]


class _EngineCollector(Collector):
    """Gauges and cumulative counters read from the engine at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        stats = self._metrics.stats_fn()
        labels = [self._metrics.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(f"lightgate:{name}", doc, labels=["model_name"])
            family.add_metric(labels, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(f"lightgate:{name}", doc, labels=["model_name"])
            family.add_metric(labels, value)
            return family

        yield gauge("num_requests_running", "Sequences in the running batch.", stats.num_running if stats else 0)
        yield gauge("num_requests_waiting", "Sequences waiting to be admitted.", stats.num_waiting if stats else 0)
        yield gauge("kv_cache_usage_perc", "Fraction of KV slots in use (0..1).", stats.kv_cache_usage if stats else 0)
        yield gauge(
            "kv_cache_capacity_tokens", "Tokens the KV pool holds.", stats.kv_cache_capacity_tokens if stats else 0
        )
        yield counter(
            "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
            stats.prefix_cache_queries if stats else 0,
        )
        yield counter(
            "prefix_cache_hits", "Prompt tokens found in the prefix cache.", stats.prefix_cache_hits if stats else 0
        )


class _PerTokenCollector(Collector):
    """The per-token series (generated tokens, inter-token latency), counted in plain numbers by
    `_TokenCounts` and read at scrape time: prometheus-client's Counter and Histogram take a lock
    and walk the buckets on every update, which here is every token of every stream, on the
    thread that also runs the engine loop."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        counts = dict(self._metrics.token_counts)
        tokens = CounterMetricFamily("lightgate:generation_tokens", "Generated tokens.", labels=["model_name"])
        itl = HistogramMetricFamily(
            "lightgate:inter_token_latency_seconds",
            "Time between two tokens of one request (tokens that come together share the gap).",
            labels=["model_name"],
        )
        for name, c in counts.items():
            tokens.add_metric([name], c.generation_tokens)
            buckets, total = [], 0
            for bound, n in zip((*_ITL_BUCKETS, float("inf")), list(c.itl_buckets), strict=True):
                total += n
                buckets.append((floatToGoString(bound), total))
            itl.add_metric([name], buckets, c.itl_sum)
        yield tokens
        yield itl


@dataclass(slots=True)
class _TokenCounts:
    """One model name's per-token counts (see `_PerTokenCollector`)."""

    generation_tokens: int = 0
    itl_buckets: list[int] = field(default_factory=lambda: [0] * (len(_ITL_BUCKETS) + 1))  # last: +Inf
    itl_sum: float = 0.0

    def observe_itl(self, gap: float, count: int) -> None:
        """`count` gaps of `gap` seconds each."""
        self.itl_buckets[bisect_left(_ITL_BUCKETS, gap)] += count  # the first bucket with gap <= le
        self.itl_sum += gap * count


class Metrics:
    def __init__(self, stats_fn: StatsFn, model_name: str = "") -> None:
        # No `*_created` series beside every counter and histogram (prometheus-client's
        # switch is process-wide), as vLLM dashboards expect.
        disable_created_metrics()
        self.stats_fn = stats_fn
        self.model_name = model_name
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self.prompt_tokens = Counter(
            "lightgate:prompt_tokens", "Prefilled prompt tokens.", labels, registry=self.registry
        )
        self.request_success = Counter(
            "lightgate:request_success", "Finished requests by finish reason.",
            [*labels, "finished_reason"], registry=self.registry,
        )
        self.ttft = Histogram(
            "lightgate:time_to_first_token_seconds", "Time from arrival to the first generated token.",
            labels, buckets=_TTFT_BUCKETS, registry=self.registry,
        )
        self.e2e = Histogram(
            "lightgate:e2e_request_latency_seconds", "Time from arrival to the last token.",
            labels, buckets=_E2E_BUCKETS, registry=self.registry,
        )
        self.token_counts: dict[str, _TokenCounts] = {}
        self.registry.register(_PerTokenCollector(self))
        self.registry.register(_EngineCollector(self))
        self._series: _ModelSeries | None = None

    def series(self) -> _ModelSeries:
        """The per-token series of the current model name (`labels()` costs microseconds, and
        runs for every token of every stream otherwise)."""
        name = self.model_name
        if self._series is None or self._series.name != name:
            counts = self.token_counts.get(name)
            if counts is None:
                counts = self.token_counts[name] = _TokenCounts()
            self._series = _ModelSeries(name, self.prompt_tokens.labels(name), self.ttft.labels(name), counts)
        return self._series

    def recorder(self) -> RequestRecorder:
        return RequestRecorder(self, time.monotonic())

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass(frozen=True, slots=True)
class _ModelSeries:
    name: str
    prompt_tokens: Counter
    ttft: Histogram
    counts: _TokenCounts


@dataclass(slots=True)
class RequestRecorder:
    """What one engine request contributes to the metrics; each method is cheap and idempotent."""

    metrics: Metrics
    arrival_time: float
    last_token_time: float | None = None
    finished: bool = False

    def on_tokens(self, num_prompt_tokens: int, num_new_tokens: int) -> None:
        if num_new_tokens <= 0 or self.finished:
            return
        now = time.monotonic()
        series = self.metrics.series()
        if self.last_token_time is None:
            series.ttft.observe(now - self.arrival_time)
            series.prompt_tokens.inc(num_prompt_tokens)
        else:
            # Several tokens at once (a stream that fell behind gets them merged): one gap each.
            series.counts.observe_itl((now - self.last_token_time) / num_new_tokens, num_new_tokens)
        self.last_token_time = now
        series.counts.generation_tokens += num_new_tokens

    def on_finish(self, finished_reason: str) -> None:
        if self.finished:
            return
        self.finished = True
        name = self.metrics.model_name
        self.metrics.e2e.labels(name).observe(time.monotonic() - self.arrival_time)
        self.metrics.request_success.labels(name, finished_reason).inc()
