"""Tensor parallelism on CPU (gloo): tp=2 matches tp=1, bad splits fail early, a dead or hung rank fails fast."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from engine import LLM, AsyncEngine, EngineConfig, EngineDeadError, RequestOutputKind, SamplingParams
from engine.distributed import all_gather, all_reduce, check_tensor_parallel, get_tp_rank, get_tp_size
from engine.model_config import ModelConfig
from engine.outputs import RequestOutput
from tests.engine.models.harness import save_tiny_model, tiny_config
from tests.engine.models.remote_families import SAVERS, save_family

PROMPTS: list[list[int]] = [[1, 5, 9, 33, 7, 250, 4], [100, 2, 3], list(range(10, 50))]


def _run(model_dir: str, tp: int) -> list[RequestOutput]:
    # A small step budget splits the 40-token prompt into chunks (chunked prefill across ranks).
    llm = LLM(
        model_dir,
        dtype="float32",
        tensor_parallel_size=tp,
        kv_cache_memory_gb=0.01,
        max_num_batched_tokens=16,
    )
    try:
        params = SamplingParams(
            temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=5, prompt_logprobs=3
        )
        return llm.generate(PROMPTS, params)
    finally:
        llm.shutdown()


def _logprob_values(entries: list[Any] | None) -> dict[tuple[int, int], float]:
    values: dict[tuple[int, int], float] = {}
    for pos, entry in enumerate(entries or []):
        for token_id, lp in (entry or {}).items():
            values[(pos, token_id)] = lp.logprob
    return values


# Each case starts a tp=1 and a tp=2 engine (10-20 s on two cores). The default tier runs one of
# each way a model is split (`-m slow` adds the rest of the families and variants).
_SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "kind,overrides",
    [
        pytest.param("llama", {}, id="llama"),  # 4 heads, 2 kv heads: one kv head per rank
        pytest.param("qwen2", {}, id="qwen2", marks=_SLOW),  # q/k/v biases, tied embeddings
        # per-head q/k norms (replicated), head_dim != hidden / heads
        pytest.param("qwen3", {}, id="qwen3"),
        # q | k | v and gate | up fused in the checkpoint: each rank takes its rows of each
        pytest.param("phi3", {}, id="phi3"),
        pytest.param("llama", {"num_key_value_heads": 1}, id="llama-kv1"),  # fewer kv heads than ranks: replicated
        # per-head q/k LayerNorms: each rank its heads' rows; q/k/v biases; partial rotary
        pytest.param("stablelm", {"qk_layernorm": True, "use_qkv_bias": True}, id="stablelm-qk-norm", marks=_SLOW),
        # interleaved rotary reordered per rank; per-head norms with a replicated kv head
        pytest.param("cohere", {"use_qk_norm": True, "num_key_value_heads": 1}, id="cohere-qk-norm-kv1"),
        # sliding layers with rotary, global layers without
        pytest.param("cohere2", {}, id="cohere2", marks=_SLOW),
        # multi-query: the one kv head replicated, fused c_attn, learned positions
        pytest.param("gpt_bigcode", {}, id="gpt_bigcode"),
        # per-head q, k, v rows re-laid, then split by heads
        pytest.param("gpt_bigcode", {"multi_query": False}, id="gpt_bigcode-mha", marks=_SLOW),
        # LayerNorm, biases, GELU MLP, sliding window
        pytest.param("starcoder2", {"sliding_window": 6}, id="starcoder2", marks=_SLOW),
        # grouped wqkv regrouped into q, k, v before each rank takes its heads
        pytest.param("internlm2", {}, id="internlm2"),
        pytest.param("internlm2", {"num_key_value_heads": 1}, id="internlm2-kv1", marks=_SLOW),
        pytest.param("internlm3", {}, id="internlm3", marks=_SLOW),
        # q/k rows permuted (half-head interleaved rotary), then sharded
        pytest.param("glm", {}, id="glm", marks=_SLOW),
        pytest.param("glm4", {}, id="glm4", marks=_SLOW),  # replicated extra norms
        pytest.param("chatglm", {}, id="chatglm"),  # fused query_key_value and dense_h_to_4h, own names
        pytest.param("minicpm", {}, id="minicpm", marks=_SLOW),  # muP scalings, tied head
        # per-head fused q/k/v, each rank 3 heads with their own ALiBi slopes (6: not a power of two)
        pytest.param("bloom", {"num_attention_heads": 6, "hidden_size": 96}, id="bloom"),
        # each expert's gate / up rows and down columns split, router replicated
        pytest.param("mixtral", {}, id="mixtral"),
        # + a shared expert (split as a dense MLP) with its gate, a dense layer
        pytest.param("qwen2_moe", {}, id="qwen2-moe", marks=_SLOW),
        pytest.param("qwen3_moe", {}, id="qwen3-moe", marks=_SLOW),  # renormalised top-k, q/k norms
        # MLA: heads split (q_b_proj / kv_b_proj by heads, o_proj by rows), the latent pool replicated
        pytest.param("deepseek_v2", {}, id="deepseek-v2"),
        pytest.param("deepseek_v2", {"q_lora_rank": None, "attention_bias": True, "rope_parameters": {
            "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0,
            "mscale": 1.0, "mscale_all_dim": 0.707}}, id="deepseek-v2-no-q-lora-yarn", marks=_SLOW),
        # + experts (grouped top-k, scaled) and 2 shared experts split as dense MLPs, float32 router
        pytest.param("deepseek_v2_moe", {}, id="deepseek-v2-moe"),
    ],
)
def test_tp2_matches_tp1(tmp_path: Path, kind: str, overrides: dict[str, Any]) -> None:
    if kind in SAVERS:  # a family saved in its own checkpoint layout
        save_family(kind, tmp_path, vocab_size=251, **overrides)
    else:
        save_tiny_model(str(tmp_path), tiny_config(kind, vocab_size=251, **overrides))  # 251: a padded shard
    single, split = _run(str(tmp_path), 1), _run(str(tmp_path), 2)
    for a, b in zip(single, split, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for got, expected in (
            (_logprob_values(b.outputs[0].logprobs), _logprob_values(a.outputs[0].logprobs)),
            (_logprob_values(b.prompt_logprobs), _logprob_values(a.prompt_logprobs)),
        ):
            assert got.keys() == expected.keys() and expected
            assert max(abs(got[k] - expected[k]) for k in expected) < 1e-4


@pytest.mark.parametrize("family", ["qwen2_vl", pytest.param("qwen2_5_vl", marks=_SLOW)])
def test_tp2_matches_tp1_with_images(tmp_path: Path, family: str) -> None:
    """Qwen2-VL / Qwen2.5-VL with one, two and no images, chunks cut inside the images: the decoder
    split by heads, the vision tower whole on each rank, the M-RoPE offsets on every rank."""
    from tests.engine.models.test_qwen2_vl import save_tiny_qwen2_vl
    from tests.engine.test_qwen2_vl_engine import generate_with_images, same_answers

    save_tiny_qwen2_vl(tmp_path, family)
    single = generate_with_images(tmp_path, kv_cache_memory_gb=0.01)
    split = generate_with_images(tmp_path, kv_cache_memory_gb=0.01, tensor_parallel_size=2)
    assert same_answers(single[:-1], split[:-1])


@pytest.mark.parametrize(
    "kind,overrides,field",
    [
        ("llama", {"num_attention_heads": 3, "num_key_value_heads": 3, "hidden_size": 48}, "num_attention_heads"),
        ("llama", {"num_attention_heads": 6, "num_key_value_heads": 3, "hidden_size": 48}, "num_key_value_heads"),
        ("qwen3_moe", {"moe_intermediate_size": 33}, "moe_intermediate_size"),  # each expert's width
        ("qwen2_moe", {"shared_expert_intermediate_size": 45}, "shared_expert_intermediate_size"),
        ("deepseek_v2_moe", {"moe_intermediate_size": 33}, "moe_intermediate_size"),
    ],
)
def test_heads_that_do_not_divide_fail_before_any_worker_starts(
    tmp_path: Path, kind: str, overrides: dict[str, Any], field: str
) -> None:
    save_tiny_model(str(tmp_path), tiny_config(kind, **overrides))
    before = {p.pid for p in multiprocessing.active_children()}
    with pytest.raises(ValueError, match=field):
        LLM(str(tmp_path), dtype="float32", tensor_parallel_size=2, kv_cache_memory_gb=0.01)
    assert {p.pid for p in multiprocessing.active_children()} <= before


def test_split_checks_and_collectives_without_a_group() -> None:
    config = tiny_config("llama", num_key_value_heads=1, num_attention_heads=8, hidden_size=64)
    check_tensor_parallel(ModelConfig.from_hf_config(config), 4, "cpu")  # 1 kv head replicated on 4 ranks
    with pytest.raises(ValueError, match="vocab_size"):
        check_tensor_parallel(ModelConfig.from_hf_config(tiny_config("llama", vocab_size=1)), 2, "cpu")
    x = torch.randn(2, 3)
    assert (get_tp_rank(), get_tp_size()) == (0, 1)
    assert all_reduce(x) is x and all_gather(x) is x  # tp=1: no process group, no copies


def _alive(pids: list[int]) -> list[int]:
    children = {p.pid for p in multiprocessing.active_children()}  # also reaps exited children
    return [pid for pid in pids if pid in children]


@pytest.mark.parametrize("victim", [0, 1])
async def test_a_killed_rank_fails_requests_and_leaves_no_process(tmp_path: Path, victim: int) -> None:
    save_tiny_model(str(tmp_path), tiny_config("llama"))
    engine = AsyncEngine(
        EngineConfig(model=str(tmp_path), dtype="float32", kv_cache_memory_gb=0.01, tensor_parallel_size=2)
    )
    await engine.start()
    assert engine.core is not None
    pids = [pid for pid in engine.core.worker.pids if pid is not None]
    try:
        assert len(pids) == 2 and len(_alive(pids)) == 2
        params = SamplingParams(max_tokens=400, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
        stream = engine.generate(list(range(3, 40)), params, "victim")
        await stream.__anext__()
        os.kill(pids[victim], signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        assert time.monotonic() - start < 5
        assert engine.errored
        deadline = time.monotonic() + 5
        while _alive(pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _alive(pids) == []  # the surviving rank was ended, not left waiting in a collective
    finally:
        await engine.shutdown()
    assert _alive(pids) == []


STEP_TIMEOUT_S = 2.0


@pytest.mark.parametrize("tp,victim", [(1, 0), (2, 0), (2, 1)], ids=["tp1", "tp2-rank0", "tp2-rank1"])
async def test_a_hung_rank_fails_requests_within_the_step_timeout(
    tmp_path: Path, tp: int, victim: int
) -> None:
    """SIGSTOP one rank mid-generation: it neither answers nor exits (at tp=2 the other rank
    then waits in a collective). The step watchdog must fail the request within the timeout
    plus a little, and kill every rank (SIGKILL ends stopped processes too)."""
    from engine.config import WARMUP_STEPS

    save_tiny_model(str(tmp_path), tiny_config("llama"))
    engine = AsyncEngine(
        EngineConfig(
            model=str(tmp_path),
            dtype="float32",
            kv_cache_memory_gb=0.01,
            tensor_parallel_size=tp,
            step_timeout_s=STEP_TIMEOUT_S,
        )
    )
    await engine.start()
    assert engine.core is not None
    pids = [pid for pid in engine.core.worker.pids if pid is not None]
    try:
        assert len(pids) == tp and len(_alive(pids)) == tp
        params = SamplingParams(max_tokens=400, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
        stream = engine.generate(list(range(3, 40)), params, "victim")
        for _ in range(WARMUP_STEPS + 2):  # past the warm-up steps, which get a longer timeout
            await stream.__anext__()
        os.kill(pids[victim], signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(EngineDeadError, match="step_timeout_s") as info:
            async for _ in stream:
                pass
        elapsed = time.monotonic() - start
        assert elapsed < STEP_TIMEOUT_S + 3, elapsed
        assert f"rank {victim}: stopped" in str(info.value)
        assert engine.errored
        with pytest.raises(EngineDeadError):  # new requests are refused at once
            await engine.generate([1, 2, 3], SamplingParams(max_tokens=2), "late").__anext__()
        deadline = time.monotonic() + 5
        while _alive(pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _alive(pids) == []  # the stopped rank and its peer were killed
    finally:
        for pid in pids:  # never leave a stopped process behind, even when an assertion failed
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await engine.shutdown()
    assert _alive(pids) == []


def test_step_timeout_defaults_and_validation() -> None:
    from engine.config import DEFAULT_STEP_TIMEOUT_S_CPU, DEFAULT_STEP_TIMEOUT_S_GPU

    assert EngineConfig(device="cpu").resolved_step_timeout_s() == DEFAULT_STEP_TIMEOUT_S_CPU == 300
    assert EngineConfig(device="cuda").resolved_step_timeout_s() == DEFAULT_STEP_TIMEOUT_S_GPU == 60
    assert EngineConfig(device="cpu", step_timeout_s=0).resolved_step_timeout_s() is None  # no watchdog
    resolved = EngineConfig(device="cpu").resolve(max_position_embeddings=64)
    assert (
        resolved.step_timeout_s == 300 and resolved.resolve(max_position_embeddings=64).step_timeout_s == 300
    )
    assert (
        EngineConfig(device="cpu", step_timeout_s=0).resolve(max_position_embeddings=64).step_timeout_s == 0
    )
    with pytest.raises(ValueError, match="step_timeout_s"):
        EngineConfig(step_timeout_s=-1)


def test_running_sequence_cap_defaults_by_device() -> None:
    """512 running sequences on a GPU (larger steps, more throughput), 256 on CPU; a value given wins."""
    assert EngineConfig(device="cpu").resolve(max_position_embeddings=64).max_num_seqs == 256
    assert EngineConfig(device="cuda").resolve(max_position_embeddings=64).max_num_seqs == 1024
    assert EngineConfig(device="cuda", max_num_seqs=7).resolve(max_position_embeddings=64).max_num_seqs == 7
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=0)
