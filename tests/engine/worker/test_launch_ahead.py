"""The worker launching step k+1 before step k's tokens reach the host (`launch_ahead`, on by
default on a GPU, forced here on the CPU) gives exactly what finishing each step first gives:
step k's tokens are in before step k+1 samples (seeds, min_tokens and penalties count them),
rows and slots are reused behind launched steps."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from engine import LLM, EngineConfig, SamplingParams
from engine.outputs import OutputAccumulator, RequestOutput
from tests.engine.models.harness import save_tiny_model, tiny_config
from tests.engine.test_overlap import _assert_same


def _params(stops: list[int]) -> list[SamplingParams]:
    params = []
    for i in range(14):
        kw: dict = dict(temperature=0.0, max_tokens=6 + 3 * i, ignore_eos=True, logprobs=1)
        if i < 3:
            kw["stop_token_ids"] = [stops[i]]  # stops midway: a step launched behind it is wasted
        if i == 3:
            kw.update(prompt_logprobs=2)
        if i == 4:
            kw.update(n=2, temperature=0.9, seed=11)  # seeds hash the number of tokens so far
        if i == 5:
            kw.update(temperature=1.0, top_k=20, seed=3)
        if i in (6, 7):  # penalties count the previous step's ids
            kw.update(frequency_penalty=2.0, presence_penalty=1.0, repetition_penalty=1.5)
        if i == 8:
            kw.update(temperature=0.8, seed=5, frequency_penalty=1.0)
        if i == 9:
            kw.update(stop_token_ids=[stops[0]], min_tokens=8)  # min_tokens counts tokens in flight
        if i == 10:
            kw.update(temperature=0.7)  # unseeded: drawn from the worker's own random source
        params.append(SamplingParams(**kw))
    return params


def _run(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> tuple[list[RequestOutput], int, int]:
    """The offline loop (`EngineCore.step`), counting the results that came after the next
    step's launch."""
    core = llm.core
    accs = {}
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        core.add_request(f"r{i}", prompt, p)
        accs[f"r{i}"] = OutputAccumulator(p.n)
    steps = ahead = 0
    while core.has_work:
        core.plan_ahead(send=True)
        if not core.num_in_flight:
            break
        result = core.recv_result()
        steps += 1
        ahead += result.launched_ahead
        for out in core.process_result(result).outputs:
            accs[out.request_id].add(out)
    return [accs[f"r{i}"].result() for i in range(len(prompts))], steps, ahead


def test_launched_ahead_matches_finishing_each_step_first(tmp_path: Path) -> None:
    save_tiny_model(str(tmp_path), tiny_config("llama"))
    rng = random.Random(9)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randrange(3, 50))] for _ in range(14)]
    # A small pool and aggressive admission (preemption), 24-token steps (chunked prompts beside
    # decodes), 6 rows (reused as requests finish); the pool holds ~200 tokens.
    settings = dict(dtype="float32", kv_cache_memory_gb=200 * 2 * 2 * 2 * 16 * 4 / 2**30, max_num_batched_tokens=24,
                    max_num_seqs=6, admission="aggressive", seed=1)
    results = {}
    for ahead in (False, True):
        with LLM(str(tmp_path), launch_ahead=ahead, **settings) as llm:
            if not results:  # tokens the greedy runs produce midway, as stop tokens
                probe = llm.generate(prompts[:3], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
                stops = [o.outputs[0].token_ids[5] for o in probe]
                params = _params(stops)
                llm.core.scheduler.reset_prefix_cache()
            outs, steps, launched_ahead = _run(llm, prompts, params)
            assert llm.core.scheduler.num_preemptions > 0  # the pressure is real
            if ahead:
                assert launched_ahead > steps // 4  # results held for the next launch
            else:
                assert launched_ahead == 0
            llm.core.scheduler.reset_prefix_cache()
            assert llm.core.scheduler.allocator.num_free == llm.core.scheduler.allocator.num_slots
            results[ahead] = outs
    for got, want in zip(results[True], results[False], strict=True):
        _assert_same(got, want)
    # The penalties bite: those requests never repeat a token right away (without their last
    # ids, the step launched ahead would not see them).
    for i in (6, 7):
        ids = results[True][i].outputs[0].token_ids
        assert all(a != b for a, b in zip(ids, ids[1:], strict=False))


@pytest.mark.parametrize(("device", "overlap", "setting", "expected"), [
    ("cpu", True, None, False),
    ("cpu", True, True, True),
    ("cuda", True, None, True),
    ("cuda", False, None, False),
    ("cuda", False, True, False),
    ("cuda", True, False, False),
])
def test_launch_ahead_defaults_to_gpus_with_overlap(device: str, overlap: bool, setting: bool | None,
                                                    expected: bool) -> None:
    config = EngineConfig(device=device, overlap_scheduling=overlap, launch_ahead=setting)
    assert config.resolved_launch_ahead() is expected
