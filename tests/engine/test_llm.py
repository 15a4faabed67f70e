"""The offline API end to end: real worker process, real models, transformers as the oracle."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams, StructuredOutput
from engine.router.slot_allocator import KVSlotAllocator
from engine.worker.kv_pool import kv_bytes_per_token
from tests.engine.models.harness import save_tiny_model, tiny_config

GREEDY_TOKENS = 24


def _hf_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _prompts(num: int, seed: int = 0, vocab: int = 256) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(3, 40))] for _ in range(num)]


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "qwen3", "phi3"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp(request.param)
    hf = save_tiny_model(str(path), tiny_config(request.param))
    with LLM(str(path), dtype="float32", kv_cache_memory_gb=0.01) as llm:
        yield hf, llm


def test_greedy_tokens_match_transformers(tiny) -> None:
    hf, llm = tiny
    prompts = _prompts(3)
    params = SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS, ignore_eos=True)
    outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.prompt_token_ids == prompt
        assert out.outputs[0].token_ids == _hf_greedy(hf, prompt, GREEDY_TOKENS)
        assert out.outputs[0].finish_reason == "length"


def test_staggered_arrivals_equal_solo_runs(tiny) -> None:
    """8 prompts of different lengths joining at different steps: each as if run alone."""
    _, llm = tiny
    prompts = _prompts(8, seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS, ignore_eos=True)
    solo = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    core = llm.core
    results: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    step = 0
    while pending or core.has_work:
        if pending and step % 3 == 0:  # a new request every third step
            i, prompt = pending.pop(0)
            core.add_request(f"stagger-{i}", prompt, params)
        for out in core.step():
            results.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
        step += 1
    assert [results[f"stagger-{i}"] for i in range(8)] == solo
    core.scheduler.reset_prefix_cache()
    assert core.allocator.num_free == core.allocator.num_slots


def test_prompt_logprobs_match_transformers(tiny) -> None:
    hf, llm = tiny
    prompt = _prompts(1, seed=2)[0]
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=3, logprobs=3))[0]
    with torch.inference_mode():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)
    assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        assert entry is not None
        assert entry[prompt[pos]].logprob == pytest.approx(ref[pos - 1, prompt[pos]].item(), abs=1e-4)
        top = ref[pos - 1].topk(3)
        for tid, value in zip(top.indices.tolist(), top.values.tolist(), strict=True):
            assert entry[tid].logprob == pytest.approx(value, abs=1e-4)
    first = out.outputs[0].logprobs[0]
    assert first[out.outputs[0].token_ids[0]].rank == 1  # greedy picks the most likely token


def test_kv_pressure_all_finish_with_unpressured_outputs(tmp_path: Path) -> None:
    """32 requests needing ~10x a pool of a few hundred tokens: all finish, outputs unchanged."""
    config = tiny_config("llama")
    save_tiny_model(str(tmp_path), config)
    prompts = _prompts(32, seed=3)
    params = [
        SamplingParams(temperature=0.0, max_tokens=60 + i % 40, ignore_eos=True) for i in range(len(prompts))
    ]
    need = sum(len(p) + sp.max_tokens for p, sp in zip(prompts, params, strict=True))
    with LLM(str(tmp_path), dtype="float32") as roomy:
        expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, params)]
    per_token = kv_bytes_per_token(2, 2, 16, torch.float32)
    for admission in ("conservative", "aggressive"):
        with LLM(str(tmp_path), dtype="float32", kv_cache_memory_gb=300 * per_token / (1 << 30), admission=admission) as tight:
            assert 250 <= tight.kv_cache_tokens <= 300 and need >= 10 * tight.kv_cache_tokens
            outs = tight.generate(prompts, params)
            assert [o.outputs[0].token_ids for o in outs] == expected
            allocator: KVSlotAllocator = tight.core.allocator
            tight.core.scheduler.reset_prefix_cache()
            assert allocator.num_free == allocator.num_slots
            assert not tight.core.scheduler.has_unfinished


def test_directory_without_tokenizer_generates_from_token_ids(tiny) -> None:
    _, llm = tiny
    assert llm.get_tokenizer() is None
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 4 and out.outputs[0].text == ""
    with pytest.raises(ValueError, match="token ids"):
        llm.generate(["text needs a tokenizer"])
    constrained = SamplingParams(max_tokens=4, structured_output=StructuredOutput(regex="[a-z]+"))
    with pytest.raises(ValueError, match="constrained decoding needs one") as e:  # a grammar needs the tokens' text
        llm.generate([[5, 6, 7]], constrained)
    assert e.value.args[1] == "structured_output"


def test_shutdown_leaves_no_worker(tmp_path: Path) -> None:
    save_tiny_model(str(tmp_path), tiny_config("llama"))
    llm = LLM(str(tmp_path), dtype="float32", kv_cache_memory_gb=0.01)
    worker = llm.core.worker
    assert worker.alive
    llm.shutdown()
    assert not any(proc.is_alive() for proc in worker._procs)
