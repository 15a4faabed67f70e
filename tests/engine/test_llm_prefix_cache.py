"""The prefix cache end to end: greedy outputs unchanged, cached tokens reported, nothing leaked."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from engine.model_config import ModelConfig
from engine.worker.kv_pool import KVLayout
from tests.engine.models.harness import save_tiny_model, tiny_config


def _shared_prefix_prompts(num: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    systems = [[rng.randrange(3, 256) for _ in range(24)] for _ in range(2)]
    return [systems[i % 2] + [rng.randrange(3, 256) for _ in range(rng.randrange(1, 20))] for i in range(num)]


@pytest.mark.parametrize("kind", ["llama", "deepseek_v2"])  # per-head K/V, and MLA's latents
def test_outputs_equal_with_cache_on_and_off_under_pressure(kind: str, tmp_path: Path) -> None:
    """Shared system prompts, n > 1, chunked prefill and a pool small enough to preempt."""
    config = tiny_config(kind)
    save_tiny_model(str(tmp_path), config)
    prompts = _shared_prefix_prompts(12, seed=4)
    params = [
        SamplingParams(temperature=0.0, max_tokens=20 + 7 * (i % 3), ignore_eos=True, n=1 + i % 3)
        for i in range(len(prompts))
    ]
    per_token = KVLayout.for_model(ModelConfig.from_hf_config(config), 1, torch.float32).bytes_per_token()
    results = {}
    for enabled in (False, True):
        with LLM(
            str(tmp_path), dtype="float32", kv_cache_memory_gb=200 * per_token / (1 << 30),
            max_num_batched_tokens=16, admission="aggressive", enable_prefix_caching=enabled,
        ) as llm:
            outs = llm.generate(prompts, params)
            results[enabled] = [[c.token_ids for c in o.outputs] for o in outs]
            core = llm.core
            assert core.stats().kv_cache_usage == 0 and not core.scheduler.has_unfinished
            if enabled:
                assert core.scheduler.num_preemptions > 0
                stats = core.stats()
                assert 0 < stats.prefix_cache_hits < stats.prefix_cache_queries
                again = llm.generate([prompts[0]], params[0])[0]
                assert again.num_cached_tokens >= 24  # at least the system prompt survived eviction
                again = llm.generate([prompts[0]], params[0])[0]
                assert again.num_cached_tokens == len(prompts[0]) - 1
                assert [c.token_ids for c in again.outputs] == results[True][0]
            core.scheduler.reset_prefix_cache()
            assert core.allocator.num_free == core.allocator.num_slots
    assert results[True] == results[False]


def test_prefix_cache_with_int8_kv(tmp_path: Path) -> None:
    """With an int8 pool the cached prefix is the quantized one, as a fresh prefill would write it."""
    save_tiny_model(str(tmp_path), tiny_config("qwen2"))
    prompts = _shared_prefix_prompts(6, seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, n=2)
    results = {}
    for enabled in (False, True):
        with LLM(str(tmp_path), dtype="float32", kv_cache_dtype="int8", kv_cache_memory_gb=0.01,
                 enable_prefix_caching=enabled) as llm:
            first = [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params)]
            again = llm.generate(prompts, params)
            if enabled:
                assert all(o.num_cached_tokens == len(p) - 1 for o, p in zip(again, prompts, strict=True))
            results[enabled] = (first, [[c.token_ids for c in o.outputs] for o in again])
    assert results[True] == results[False]


def test_a_running_requests_prompt_is_reused_before_it_finishes(tmp_path: Path) -> None:
    """A prompt is cached once its prefill is done: a request with the same prefix that arrives
    while the first one still decodes computes only its own suffix (a burst of requests with a
    shared system prompt does not compute it once per request), with the same greedy output."""
    save_tiny_model(str(tmp_path), tiny_config("llama"))
    rng = random.Random(6)
    system = [rng.randrange(3, 256) for _ in range(40)]
    first, second = system + [5, 6, 7], system + [9, 10]
    long = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    short = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    with LLM(str(tmp_path), dtype="float32", kv_cache_memory_gb=0.01) as llm:
        core = llm.core
        core.add_request("first", first, long)
        for _ in range(3):  # the prompt in one step, then decodes
            core.step()
        core.add_request("second", second, short)
        tokens: list[int] = []  # the second request's output, from its deltas
        cached = -1
        while core.has_work:
            for out in core.step():
                if out.request_id == "second":
                    tokens += out.outputs[0].token_ids
                    cached = max(cached, out.num_cached_tokens)
        assert cached == len(system)
        assert core.stats().kv_cache_usage == 0
    with LLM(str(tmp_path), dtype="float32", kv_cache_memory_gb=0.01, enable_prefix_caching=False) as llm:
        want = llm.generate([second], short)[0]
    assert tokens == want.outputs[0].token_ids
