"""`lightgate bench serve`: the pure pieces on synthetic data, then the client against a real
server on the tiny model."""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

import pytest

from bench import http_client as bh
from bench import report as br
from bench import serve as bs
from tests.openai_compat.servers import ProcessServer

# -- lengths, prompts, arrivals ------------------------------------------------------------


def test_sample_lengths_stay_in_bounds_and_reach_both_ends() -> None:
    lengths = bh.sample_lengths(random.Random(0), (3, 7), 2000)
    assert min(lengths) == 3 and max(lengths) == 7
    assert bh.sample_lengths(random.Random(0), (5, 5), 4) == [5, 5, 5, 5]
    assert lengths == bh.sample_lengths(random.Random(0), (3, 7), 2000)  # seeded


def test_build_requests_is_seeded_and_shares_the_prefix() -> None:
    w = bh.Workload(20, (4, 9), (2, 5), shared_prefix_len=6, seed=3)
    specs = bh.build_requests(w)
    assert len(specs) == 20
    prefix = specs[0].prompt[:6]
    for spec in specs:
        assert spec.prompt[:6] == prefix
        assert 6 + 4 <= len(spec.prompt) <= 6 + 9 and 2 <= spec.output_len <= 5
        assert all(bh.TOKEN_IDS[0] <= t < bh.TOKEN_IDS[1] for t in spec.prompt)
    assert [s.prompt for s in bh.build_requests(w)] == [s.prompt for s in specs]
    other = bh.build_requests(bh.Workload(20, (4, 9), (2, 5), shared_prefix_len=6, seed=4))
    assert [s.prompt for s in other] != [s.prompt for s in specs]
    assert specs[0].sampling == {"temperature": 0.0}  # greedy by default
    sampled = bh.build_requests(bh.Workload(2, (4, 9), (2, 5), temperature=0.7, top_p=0.9))
    assert sampled[0].sampling == {"temperature": 0.7, "top_p": 0.9}


def test_arrivals_all_at_once_or_poisson() -> None:
    assert bh.arrival_times(5, math.inf) == [0.0] * 5
    times = bh.arrival_times(20000, 8.0, seed=1)
    assert times[0] == 0.0 and all(b >= a for a, b in zip(times, times[1:], strict=False))
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    mean = sum(gaps) / len(gaps)
    assert abs(mean - 1 / 8) < 0.005  # exponential gaps of mean 1/rate
    std = math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps))
    assert abs(std / mean - 1) < 0.05  # an exponential's std equals its mean
    assert times == bh.arrival_times(20000, 8.0, seed=1)
    with pytest.raises(ValueError):
        bh.arrival_times(3, 0.0)


# -- metrics -------------------------------------------------------------------------------


def test_percentile_matches_numpy() -> None:
    np = pytest.importorskip("numpy")
    rng = random.Random(0)
    for n in (1, 2, 7, 100):
        values = [rng.random() for _ in range(n)]
        for q in (0, 1, 50, 90, 99, 100):
            assert bs.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert bs.summarize([]) == dict.fromkeys(("mean", "p50", "p90", "p99", "min", "max"))


def _result(ttft: float, gaps: list[float], tokens: int, prompt_len: int = 10) -> bh.RequestResult:
    times = [ttft]
    for gap in gaps:
        times.append(times[-1] + gap)
    return bh.RequestResult(prompt_len=prompt_len, output_len=tokens, ok=True, ttft=ttft, latency=times[-1],
                            output_tokens=tokens, chunk_times=times)


def test_metrics_from_synthetic_timestamps() -> None:
    a = _result(0.1, [0.02, 0.04, 0.03], tokens=4, prompt_len=10)  # latency 0.19
    b = _result(0.3, [0.01] * 9, tokens=10, prompt_len=20)  # latency 0.39
    c = bh.RequestResult(prompt_len=5, output_len=8, error="HTTP 400: too long")
    assert a.tpot == pytest.approx((0.19 - 0.1) / 3)
    assert a.itls == pytest.approx([0.02, 0.04, 0.03])
    m = bs.compute_metrics([a, b, c], duration=2.0)
    assert (m["completed"], m["failed"], m["first_error"]) == (2, 1, "HTTP 400: too long")
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (30, 14)
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["output_throughput"] == pytest.approx(7.0)
    assert m["total_token_throughput"] == pytest.approx(22.0)
    assert m["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert m["ttft_ms"]["p50"] == pytest.approx(200.0) and m["ttft_ms"]["max"] == pytest.approx(300.0)
    assert m["tpot_ms"]["p50"] == pytest.approx(1e3 * (0.03 + 0.01) / 2)
    assert m["itl_ms"]["max"] == pytest.approx(40.0) and m["itl_ms"]["min"] == pytest.approx(10.0)
    assert m["e2el_ms"]["p50"] == pytest.approx(290.0)
    assert m["cached_prompt_tokens"] is None
    d = bs.distributions([a, b, c])
    assert len(d["ttft_ms"]) == len(bs.QUANTILES) and d["ttft_ms"][0] == 100.0 and d["ttft_ms"][-1] == 300.0
    assert d["itl_ms"] == sorted(d["itl_ms"])


def test_sse_parser_splits_events_across_reads() -> None:
    p = bh.SSEParser()
    body = 'data: {"a": "é"}\r\n\r\n: ping\n\ndata: one\ndata: two\n\ndata: [DONE]\n\n'.encode()
    events = []
    for i in range(len(body)):  # one byte at a time: events and characters span reads
        events += p.feed(body[i:i + 1])
    assert events == ['{"a": "é"}', "one\ntwo", "[DONE]"]


# -- command line and reports --------------------------------------------------------------


def _args(*argv: str) -> argparse.Namespace:
    return bs.build_parser().parse_args(list(argv))


def test_presets_with_overrides() -> None:
    w = bs.workloads_from_args(_args("--workload", "bs1,online8rps", "--num-requests", "7"))
    assert list(w) == ["bs1", "online8rps"]
    assert w["bs1"].num_requests == 7 and w["bs1"].max_concurrency == 1 and w["bs1"].prompt_len == (512, 512)
    assert w["online8rps"].request_rate == 8.0 and w["online8rps"].output_len == (64, 512)
    w = bs.workloads_from_args(_args("--workload", "prefix16rps", "--sequential"))
    assert w["prefix16rps"].max_concurrency == 1 and math.isinf(w["prefix16rps"].request_rate)
    assert w["prefix16rps"].shared_prefix_len == 1536
    w = bs.workloads_from_args(_args("--num-requests", "3", "--prompt-len", "5:9", "--output-len", "4",
                                     "--request-rate", "inf"))
    assert w == {"custom": bh.Workload(3, (5, 9), (4, 4))}
    with pytest.raises(SystemExit):
        bs.workloads_from_args(_args("--num-requests", "3"))
    with pytest.raises(SystemExit):
        bs.workloads_from_args(_args("--workload", "nope"))
    with pytest.raises(SystemExit):
        _args("--prompt-len", "9:5")


def _run(label: str, workloads: dict[str, dict[str, float | None]]) -> dict:
    def metrics(p50: float, cached: int | None) -> dict:
        stats = {"mean": p50, "p50": p50, "p90": p50, "p99": 2 * p50, "min": p50, "max": 2 * p50}
        return {"completed": 3, "failed": 0, "first_error": None, "duration_s": 1.0, "request_throughput": 3.0,
                "output_throughput": 100.0, "total_token_throughput": 300.0, "ttft_ms": stats,
                "tpot_ms": stats, "itl_ms": stats, "cached_prompt_tokens": cached}
    return {"label": label, "base_url": "u", "model": "m", "server": {},
            "workloads": {name: {"metrics": metrics(v["p50"], v.get("cached"))} for name, v in workloads.items()}}


def test_merge_and_reference_table() -> None:
    runs = br.merge_runs([
        {"runs": [_run("bf16", {"bs1": {"p50": 6.0}})]},
        {"runs": [_run("bf16", {"prefix16rps": {"p50": 20.0, "cached": 900}}),
                  _run("nocache", {"prefix16rps": {"p50": 50.0, "cached": 0}})]},
    ])
    assert [r["label"] for r in runs] == ["bf16", "nocache"]
    assert list(runs[0]["workloads"]) == ["bs1", "prefix16rps"]
    table = br.format_reference_table(runs)
    rows = {line[:37].strip(): line.split() for line in table.splitlines()[2:]}
    assert rows["bs1          TPOT p50 ms"][4:] == ["6.00", "-", "7.25", "7.38", "<=", "5.5"]
    assert rows["prefix16rps  TTFT p50 ms, cache on"][6:] == ["20.0", "-", "98.0", "-", "<=", "30"]
    assert rows["prefix16rps  TTFT p50 ms, cache off"][6:8] == ["-", "50.0"]
    assert "offline1000" not in table
    assert "bf16" in br.format_table(runs)


def test_plot_draws_the_cdfs(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")  # the `bench` extra, not the test one
    results = [_result(0.1 * (i + 1), [0.01 * (i + 1)] * 5, tokens=6) for i in range(8)]
    run = _run("x", {"bs1": {"p50": 1.0}})
    run["workloads"]["bs1"]["distributions"] = bs.distributions(results)
    assert br.plot([run, _run("empty", {"online8rps": {"p50": 1.0}})], str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_without_matplotlib_says_so(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                         tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    assert not br.plot([_run("x", {"bs1": {"p50": 1.0}})], str(tmp_path / "p.png"))
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()


# -- against a real server -----------------------------------------------------------------


def test_bench_serve_against_the_tiny_server(tiny_server: ProcessServer, tmp_path: Path) -> None:
    url = f"{tiny_server.url}/v1"
    out_a, out_b, merged = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "merged.json"
    # Two presets, cut small: one request at a time, then all at once.
    assert bs.main(["--base-url", url, "--workload", "cpu1", "cpu16", "--num-requests", "4",
                    "--prompt-len", "8:40", "--output-len", "3:9", "--no-progress", "--label", "presets",
                    "--json", str(out_a)]) == 0
    # Poisson arrivals, a shared prefix and a chat client's sampling, the client through the
    # `lightgate` command line.
    from openai_compat.cli import main as cli_main

    assert cli_main(["bench", "serve", "--base-url", url, "--num-requests", "5", "--prompt-len", "4:12",
                     "--output-len", "2:6", "--request-rate", "50", "--shared-prefix-len", "48", "--warmup", "0",
                     "--temperature", "0.8", "--top-p", "0.9", "--top-k", "20",
                     "--no-progress", "--label", "poisson", "--json", str(out_b)]) == 0

    (run_a,) = json.loads(out_a.read_text())["runs"]
    (run_b,) = json.loads(out_b.read_text())["runs"]
    assert run_a["model"] == "tiny" and run_a["label"] == "presets"
    assert run_a["server"]["kv_cache_capacity_tokens"] > 0
    assert list(run_a["workloads"]) == ["cpu1", "cpu16"] and list(run_b["workloads"]) == ["custom"]
    assert run_a["workloads"]["cpu16"]["config"]["max_concurrency"] == 16
    assert run_b["workloads"]["custom"]["config"]["request_rate"] == 50.0
    assert run_a["workloads"]["cpu1"]["config"]["temperature"] == 0.0  # greedy unless asked
    assert {k: run_b["workloads"]["custom"]["config"][k] for k in ("temperature", "top_p", "top_k")} == {
        "temperature": 0.8, "top_p": 0.9, "top_k": 20}
    for w in [*run_a["workloads"].values(), *run_b["workloads"].values()]:
        m = w["metrics"]
        n = w["config"]["num_requests"]
        assert (m["completed"], m["failed"], m["first_error"]) == (n, 0, None)
        for r in w["requests"]:  # eos ignored: exactly the asked-for tokens
            assert r["output_tokens"] == r["output_len"] and r["error"] is None
            assert 0 < r["ttft_ms"] <= r["latency_ms"]
        assert m["total_output_tokens"] == m["requested_output_tokens"] == sum(r["output_len"] for r in w["requests"])
        assert m["total_input_tokens"] == sum(r["prompt_len"] for r in w["requests"])
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            s = m[key]
            assert 0 <= s["min"] <= s["p50"] <= s["p90"] <= s["p99"] <= s["max"], (key, s)
        assert m["ttft_ms"]["max"] <= m["e2el_ms"]["max"]
        assert m["duration_s"] >= m["e2el_ms"]["max"] / 1e3
        assert m["output_throughput"] == pytest.approx(m["total_output_tokens"] / m["duration_s"])
    custom = run_b["workloads"]["custom"]
    assert all(r["prompt_len"] >= 48 + 4 for r in custom["requests"])
    starts = [r["start_ms"] for r in custom["requests"]]
    assert starts == sorted(starts) and starts[-1] > 0  # sent at their Poisson times
    assert custom["metrics"]["cached_prompt_tokens"] is not None

    # Reading the files back: one merged file, both runs, nothing sent.
    assert bs.main(["--from-json", str(out_a), str(out_b), "--json", str(merged), "--compare-lightllm"]) == 0
    assert [r["label"] for r in json.loads(merged.read_text())["runs"]] == ["presets", "poisson"]


def test_bench_serve_with_a_json_schema(tiny_server: ProcessServer, tmp_path: Path) -> None:
    """Every request constrained: the shipped catalog schema keeps every answer's JSON open to
    its max_tokens; a one-digit schema closes at once, and the end tokens after it carry no text."""
    digit = tmp_path / "digit.json"
    digit.write_text(json.dumps({"type": "integer", "minimum": 0, "maximum": 9}))
    catalog = Path(__file__).resolve().parents[2] / "bench" / "schemas" / "catalog.json"
    runs = {}
    for name, schema in (("catalog", catalog), ("digit", digit)):
        out = tmp_path / f"{name}.json"
        assert bs.main(["--base-url", f"{tiny_server.url}/v1", "--num-requests", "3", "--prompt-len", "4:8",
                        "--output-len", "24:32", "--warmup", "0", "--no-progress", "--json-schema", str(schema),
                        "--json", str(out)]) == 0
        runs[name] = json.loads(out.read_text())["runs"][0]["workloads"]["custom"]
    for w in runs.values():
        assert w["config"]["json_schema"]["type"] in ("object", "integer")
        assert all(r["output_tokens"] == r["output_len"] for r in w["requests"])  # eos ignored: all of them
    assert runs["catalog"]["metrics"]["structured"]["closed"] == 0
    assert runs["catalog"]["metrics"]["structured"]["text_token_share"] > 0.8
    digit_metrics = runs["digit"]["metrics"]["structured"]
    assert digit_metrics["closed"] == digit_metrics["valid"] == 3
    assert digit_metrics["text_token_share"] <= 3 / (3 * 24)  # one token with text each
    with pytest.raises(SystemExit):
        _args("--json-schema", str(tmp_path / "missing.json"))


def test_failed_requests_are_counted_and_reported(tiny_server: ProcessServer, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fail.json"
    # Longer than the tiny server's max_model_len (512): every request is refused.
    status = bs.main(["--base-url", f"{tiny_server.url}/v1", "--num-requests", "3", "--prompt-len", "600",
                      "--output-len", "2", "--warmup", "0", "--no-progress", "--json", str(out)])
    assert status == 1
    m = json.loads(out.read_text())["runs"][0]["workloads"]["custom"]["metrics"]
    assert (m["completed"], m["failed"]) == (0, 3)
    assert m["first_error"].startswith("HTTP 400")
    assert "3 failed" in capsys.readouterr().out


def test_image_requests_are_seeded_chats_of_one_picture() -> None:
    workload = bs.WORKLOADS["image200"]
    specs = bh.build_requests(bh.Workload(3, (4, 6), (8, 8), image_size=(64, 48), seed=5))
    again = bh.build_requests(bh.Workload(3, (4, 6), (8, 8), image_size=(64, 48), seed=5))
    assert [s.messages for s in specs] == [s.messages for s in again]
    urls = [s.messages[0]["content"][0]["image_url"]["url"] for s in specs if s.messages]
    assert len(set(urls)) == 3 and all(u.startswith("data:image/jpeg;base64,") for u in urls)
    from openai_compat.images import ImagePart, decode_image, read_image_part

    part = read_image_part(argparse.Namespace(type="image_url", image_url={"url": urls[0]}), "p")
    assert decode_image(ImagePart("p", part.data), max_pixels=10**6).size == (64, 48)
    assert workload.image_size == (1024, 768) and bs.WORKLOADS["image4rps"].request_rate == 4.0


def test_bench_serve_image_chats_against_a_vision_model(tmp_path: Path) -> None:
    """The image workloads through a tiny LLaVA server: chats with a picture each, streamed,
    `prompt_len` the server's count (the image's tokens included)."""
    from tests.openai_compat.servers import TINY_ARGS, build_tiny_llava

    (tmp_path / "logs").mkdir()
    server = ProcessServer("--model", str(build_tiny_llava(tmp_path / "llava")), *TINY_ARGS,
                           log_dir=tmp_path / "logs")
    try:
        server.wait_healthy()
        out = tmp_path / "image.json"
        assert bs.main(["--base-url", f"{server.url}/v1", "--workload", "image200", "--num-requests", "2", "--warmup", "0",
                        "--output-len", "3:5", "--no-progress", "--json", str(out)]) == 0
    finally:
        server.stop()
    workload = json.loads(out.read_text())["runs"][0]["workloads"]["image200"]
    assert workload["config"]["image_size"] == [1024, 768]
    assert workload["metrics"]["completed"] == 2 and workload["metrics"]["failed"] == 0
    for r in workload["requests"]:
        assert r["output_tokens"] == r["output_len"] and r["prompt_len"] > 25  # LLaVA's 25 image tokens and words
