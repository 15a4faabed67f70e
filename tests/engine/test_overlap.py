"""Overlapped steps (step k+1 planned and sent while step k runs) give exactly what one step at a
time gives, with placeholders wasted on requests that stop, under KV pressure and chunking."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from engine.engine_core import EngineCore
from engine.outputs import OutputAccumulator, RequestOutput
from tests.engine.models.harness import save_tiny_model, tiny_config


@contextlib.contextmanager
def one_step_at_a_time(core: EngineCore) -> Iterator[EngineCore]:
    """The same cycle with one step in flight: each step is planned once the previous step's
    tokens are in, so no plan reads a placeholder (the reference overlapped steps must match)."""
    saved, core.max_in_flight = core.max_in_flight, 1
    try:
        yield core
    finally:
        core.max_in_flight = saved


def _run_one_step_at_a_time(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> list[RequestOutput]:
    accs = {}
    with one_step_at_a_time(llm.core) as core:
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            core.add_request(f"sync-{i}", prompt, p)
            accs[f"sync-{i}"] = OutputAccumulator(p.n)
        while core.has_work:
            for out in core.step():
                accs[out.request_id].add(out)
    return [accs[f"sync-{i}"].result() for i in range(len(prompts))]


def _assert_same(got: RequestOutput, want: RequestOutput) -> None:
    # Tokens, text and finish reasons exactly; logprobs up to float noise (preemption changes
    # which tokens share a step, and so the summation order).
    for g, w in zip(got.outputs, want.outputs, strict=True):
        assert (g.token_ids, g.text, g.finish_reason) == (w.token_ids, w.text, w.finish_reason)
        if w.logprobs is not None:
            assert [d[t].logprob for d, t in zip(g.logprobs, g.token_ids, strict=True)] == pytest.approx(
                [d[t].logprob for d, t in zip(w.logprobs, w.token_ids, strict=True)], abs=1e-4
            )
    if want.prompt_logprobs is not None:
        assert got.prompt_logprobs is not None and len(got.prompt_logprobs) == len(want.prompt_logprobs)
        for g, w in zip(got.prompt_logprobs[1:], want.prompt_logprobs[1:], strict=True):
            assert sorted(g) == sorted(w)
            assert [g[t].logprob for t in sorted(g)] == pytest.approx([w[t].logprob for t in sorted(w)], abs=1e-4)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_overlapped_steps_match_one_step_at_a_time(kind: str, tmp_path: Path) -> None:
    save_tiny_model(str(tmp_path), tiny_config(kind))
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randrange(3, 50))] for _ in range(14)]
    # A pool of 200 tokens for ~14 * 70 and optimistic admission: decodes preempt; 24-token steps
    # chunk the prompts, so decodes and prefill chunks share steps.
    settings = dict(dtype="float32", kv_cache_memory_gb=200 * 2 * 2 * 2 * 16 * 4 / 2**30,
                    max_num_batched_tokens=24, max_num_seqs=6, enable_prefix_caching=True,
                    admission="aggressive")
    with LLM(str(tmp_path), **settings) as llm:
        free = llm.core.scheduler.allocator.num_slots
        # The stop tokens are tokens the greedy runs produce midway: those requests stop with
        # tokens planned after them (a wasted placeholder step each).
        probe = llm.generate(prompts[:4], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
        stops = [o.outputs[0].token_ids[6] for o in probe]
        params = []
        for i in range(len(prompts)):
            kw: dict = dict(temperature=0.0, max_tokens=8 + 3 * i, ignore_eos=True, logprobs=1)
            if i < 4:
                kw["stop_token_ids"] = [stops[i]]
            if i == 4:
                kw.update(prompt_logprobs=2)
            if i == 5:
                kw.update(n=2, temperature=0.9, seed=11)
            if i == 6:
                kw.update(temperature=1.0, top_k=20, seed=3, presence_penalty=0.5, frequency_penalty=0.3)
            if i == 7:
                kw.update(stop_token_ids=[stops[0]], min_tokens=10)
            params.append(SamplingParams(**kw))
        expected = _run_one_step_at_a_time(llm, prompts, params)
        llm.core.scheduler.reset_prefix_cache()
        got = llm.generate(prompts, params)
        assert llm.core.scheduler.num_preemptions > 0  # the pressure is real
        assert not llm.core.num_in_flight
        llm.core.scheduler.reset_prefix_cache()
        assert llm.core.scheduler.allocator.num_free == free  # no slot leaked by a wasted step
    for g, e in zip(got, expected, strict=True):
        _assert_same(g, e)
    stopped = [o.outputs[0] for o in got[:4]]
    assert all(c.finish_reason == "stop" and c.token_ids[-1] == s for c, s in zip(stopped, stops, strict=True))


def test_a_refused_request_leaves_the_engine_idle_and_usable(tmp_path: Path) -> None:
    save_tiny_model(str(tmp_path), tiny_config("llama"))
    with LLM(str(tmp_path), dtype="float32", kv_cache_memory_gb=0.01) as llm:
        prompts = [[5, 6, 7]] * 3
        params = [SamplingParams(max_tokens=30, ignore_eos=True)] * 2 + [SamplingParams(max_tokens=10**6)]
        with pytest.raises(ValueError):
            llm.generate(prompts, params)  # the third request is refused after two were added
        assert not llm.core.num_in_flight and not llm.core.has_work
        out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
        assert len(out[0].outputs[0].token_ids) == 5


def test_without_overlap_a_new_request_starts_one_step_sooner(tmp_path: Path) -> None:
    """Overlapped, step k+1 is already planned when a request arrives during step k, so its
    prefill waits for step k+2; with `overlap_scheduling=False` it is in step k+1. The tokens
    are the same either way."""
    save_tiny_model(str(tmp_path), tiny_config("llama"))
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    tokens = {}
    for overlap in (True, False):
        with LLM(str(tmp_path), dtype="float32", kv_cache_memory_gb=0.01, overlap_scheduling=overlap) as llm:
            core = llm.core
            accs = {"a": OutputAccumulator(1), "b": OutputAccumulator(1)}
            seen: set[str] = set()

            def run_step(core=core, accs=accs, seen=seen) -> None:
                for out in core.step():
                    accs[out.request_id].add(out)
                    if out.outputs and out.outputs[0].token_ids:
                        seen.add(out.request_id)

            core.add_request("a", [5, 6, 7, 8], params)
            run_step()  # a's prefill; overlapped, a's next step is in flight too
            assert seen == {"a"} and core.num_in_flight == (1 if overlap else 0)
            core.add_request("b", [9, 10, 11], params)
            calls = 0
            while "b" not in seen:
                calls += 1
                run_step()
                assert core.num_in_flight <= (2 if overlap else 1)
            assert calls == (2 if overlap else 1)
            while core.has_work:
                run_step()
            tokens[overlap] = [accs[r].result().outputs[0].token_ids for r in ("a", "b")]
    assert tokens[True] == tokens[False]
    assert all(len(t) == 12 for t in tokens[True])
