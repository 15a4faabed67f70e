"""The per-token series, counted outside prometheus-client, expose what its own Counter and
Histogram would for the same observations."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from openai_compat.metrics import _ITL_BUCKETS, Metrics


def _samples(text: bytes, prefix: str) -> dict[str, float]:
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.decode().splitlines()
        if line.startswith(prefix)
    }


def test_per_token_series_match_prometheus_client() -> None:
    metrics = Metrics(lambda: None, "m")
    reference = CollectorRegistry()
    itl = Histogram("lightgate:inter_token_latency_seconds", "x", ["model_name"], buckets=_ITL_BUCKETS,
                    registry=reference).labels("m")
    tokens = Counter("lightgate:generation_tokens", "x", ["model_name"], registry=reference).labels("m")
    counts = metrics.series().counts
    # gaps on bucket bounds (le: a bound counts in its own bucket), between them, past the last
    for gap, count in [(0.001, 1), (0.0025, 2), (0.003, 1), (0.04, 3), (100.0, 1), (0.0, 1)]:
        counts.observe_itl(gap, count)
        counts.generation_tokens += count
        for _ in range(count):
            itl.observe(gap)
        tokens.inc(count)
    ours, theirs = metrics.render(), generate_latest(reference)
    for prefix in ("lightgate:inter_token_latency_seconds", "lightgate:generation_tokens_total"):
        assert _samples(ours, prefix) == _samples(theirs, prefix), prefix
    assert len(_samples(ours, "lightgate:inter_token_latency_seconds_bucket")) == len(_ITL_BUCKETS) + 1


def test_recorder_counts_a_gap_per_token() -> None:
    metrics = Metrics(lambda: None, "m")
    recorder = metrics.recorder()
    recorder.on_tokens(5, 1)  # the first token: its time to first token, no gap
    recorder.on_tokens(5, 3)  # three at once (a stream that fell behind): three gaps
    text = metrics.render()
    assert _samples(text, "lightgate:generation_tokens_total") == {'lightgate:generation_tokens_total{model_name="m"}': 4}
    assert _samples(text, "lightgate:inter_token_latency_seconds_count") == {
        'lightgate:inter_token_latency_seconds_count{model_name="m"}': 3
    }
    assert _samples(text, "lightgate:time_to_first_token_seconds_count") == {
        'lightgate:time_to_first_token_seconds_count{model_name="m"}': 1
    }
