"""The engine on a CUDA device against CPU fp32 and transformers (tier `gpu`)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from engine import LLM, SamplingParams
from tests.engine.models.harness import save_tiny_model, tiny_config
from tests.engine.models.remote_families import SAVERS, save_family

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _prompts(num: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 256) for _ in range(rng.randrange(3, 60))] for _ in range(num)]


# (backend, dtype, enforce_eager): the torch path is never graphed.
_GPU_RUNS = [
    ("torch", "float32", True),
    ("torch", "bfloat16", True),
    ("triton", "float32", True),
    ("triton", "float32", False),
    ("triton", "bfloat16", True),
    ("triton", "bfloat16", False),
]


# Each run starts an engine (a worker process that captures its graphs): the other
# architectures take the Triton runs that differ in what they exercise, llama takes all.
_RUNS_OF = {
    "llama": _GPU_RUNS,
    "mistral": [r for r in _GPU_RUNS if r[0] == "triton" and r != ("triton", "bfloat16", True)],
    "qwen2": [r for r in _GPU_RUNS if r[0] == "triton" and r != ("triton", "bfloat16", True)],
    "qwen3": [("triton", "float32", False), ("triton", "bfloat16", False)],  # q/k norms graphed
    "phi3": [("triton", "bfloat16", False)],
    "stablelm": [("triton", "float32", False), ("triton", "bfloat16", False)],  # per-head q/k norms, partial rotary
    "cohere": [("triton", "float32", False), ("triton", "bfloat16", False)],  # parallel residual, logit scale
    "cohere2": [("triton", "float32", False), ("triton", "bfloat16", False)],  # sliding + no-rotary layers
    # multi-query (one kv head for the whole group) through the Triton kernels, graphed and eager
    "gpt_bigcode": [("triton", "float32", True), ("triton", "float32", False), ("triton", "bfloat16", False)],
    "starcoder2": [("triton", "float32", False), ("triton", "bfloat16", False)],
    "internlm2": [("triton", "float32", False), ("triton", "bfloat16", False)],
    "internlm3": [("triton", "bfloat16", False)],
    "glm": [("triton", "float32", False), ("triton", "bfloat16", False)],  # partial rotary, q/k biases
    "glm4": [("triton", "bfloat16", False)],
    "chatglm": [("triton", "float32", False), ("triton", "bfloat16", True)],
    "minicpm": [("triton", "float32", False), ("triton", "bfloat16", False)],  # scalings graphed
    # ALiBi in the kernels (prefill, decode, mixed, graphed) and on the torch path
    "bloom": [r for r in _GPU_RUNS if r != ("triton", "bfloat16", True)],
    # mixture of experts: the fused Triton experts eager and graphed, the torch path once
    "mixtral": [("torch", "float32", True), ("triton", "float32", True), ("triton", "float32", False),
                ("triton", "bfloat16", False)],
    "qwen2_moe": [("triton", "float32", False), ("triton", "bfloat16", False)],
    # fp32 only: in bf16 this random model's routers flip near-ties to experts whose outputs move the
    # logits far past any tie margin (a token outside the fp32 top 5, H100, 12-07); mixtral and
    # qwen2_moe cover the bf16 fused experts
    "qwen3_moe": [("triton", "float32", True), ("triton", "float32", False)],
    # MLA: decode steps through the MLA decode kernel (graphed, and eager), packed steps through the
    # torch path (no prefill graphs)
    "deepseek_v2": [("torch", "float32", True), ("triton", "float32", True), ("triton", "float32", False),
                    ("triton", "bfloat16", False)],
    # MLA with experts (grouped top-k, shared experts): the fused experts graphed and eager
    "deepseek_v2_moe": [("triton", "float32", True), ("triton", "float32", False), ("triton", "bfloat16", False)],
}


@pytest.mark.parametrize("kind", list(_RUNS_OF))
def test_gpu_greedy_matches_cpu(kind: str, tmp_path: Path) -> None:
    if kind in SAVERS:  # a family saved in its own checkpoint layout
        save_family(kind, tmp_path)
    else:
        save_tiny_model(str(tmp_path), tiny_config(kind))
    prompts = _prompts(6)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=5)
    with LLM(str(tmp_path), device="cpu", dtype="float32", kv_cache_memory_gb=0.01) as cpu:
        expected = cpu.generate(prompts, params)
    for backend, dtype, eager in _RUNS_OF[kind]:
        with LLM(str(tmp_path), device="cuda", dtype=dtype, kv_cache_memory_gb=0.05,
                 attention_backend=backend, enforce_eager=eager, max_num_seqs=32) as gpu:
            outs = gpu.generate(prompts, params)
        for out, ref in zip(outs, expected, strict=True):
            _check_greedy(out.outputs[0], ref.outputs[0], dtype, (backend, eager), _TIE_MARGIN.get(kind, 2.0))


# bf16 logits of these peaked random models (|logit| up to ~30) carry ~0.1-0.2 nats of rounding.
_LOGPROB_TOL = {"float32": 1e-3, "bfloat16": 0.25}
# How close (in multiples of the bf16 tolerance) the float32 model's two tokens must be where a bf16
# run first picks the other. With experts, rounding may also flip a router's near-tie: another
# expert's output moves the logits by more than rounding does (Qwen3-MoE: 0.59 nats, H100, 12-07).
_TIE_MARGIN = {"mixtral": 4.0, "qwen2_moe": 4.0, "deepseek_v2_moe": 4.0}


def _check_greedy(got: Any, want: Any, dtype: str, run: tuple[str, bool], tie_margin: float = 2.0) -> None:
    """float32: the same 16 tokens. bf16: the same tokens up to a first difference, if any, and
    that difference a near-tie of the float32 model (its logprobs of the two tokens within
    `tie_margin` times bf16's rounding): rounding may flip a tie, never pick a clearly worse token."""
    tol = _LOGPROB_TOL[dtype]
    same = next((i for i, (a, b) in enumerate(zip(got.token_ids, want.token_ids, strict=True)) if a != b),
                len(want.token_ids))
    if dtype == "float32":
        assert got.token_ids == want.token_ids, run  # all 16 tokens, eager and graphed
    elif same < len(want.token_ids):
        alternatives = want.logprobs[same]  # the float32 model's top 5 (and its pick) at the difference
        flipped = got.token_ids[same]
        assert flipped in alternatives, (run, same, flipped, alternatives)
        margin = alternatives[want.token_ids[same]].logprob - alternatives[flipped].logprob
        assert margin <= tie_margin * tol, (run, same, margin)
    for i in range(same):
        tid = want.token_ids[i]
        assert got.logprobs[i][tid].logprob == pytest.approx(want.logprobs[i][tid].logprob, abs=tol), run


def test_decode_gemv_greedy_matches_cpu_and_repeats(tmp_path: Path) -> None:
    """With `decode_gemv` the decode steps' linear layers (1-8 rows; 6 prompts) take the GEMV
    kernels, eager and inside CUDA graphs: the same greedy tokens as the CPU's float32 model
    (bf16: up to a near-tie), and a second bf16 run gives the same tokens and logprobs (the split-K
    partial sums are added in a fixed order)."""
    save_tiny_model(str(tmp_path), tiny_config("llama"))
    prompts = _prompts(6)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=5)
    with LLM(str(tmp_path), device="cpu", dtype="float32", kv_cache_memory_gb=0.01) as cpu:
        expected = cpu.generate(prompts, params)
    bf16_runs = []
    for dtype, eager in [("float32", True), ("float32", False), ("bfloat16", False), ("bfloat16", False)]:
        with LLM(str(tmp_path), device="cuda", dtype=dtype, kv_cache_memory_gb=0.05, decode_gemv=True,
                 enforce_eager=eager, max_num_seqs=32) as gpu:
            outs = gpu.generate(prompts, params)
        for out, ref in zip(outs, expected, strict=True):
            _check_greedy(out.outputs[0], ref.outputs[0], dtype, ("decode_gemv", eager))
        if dtype == "bfloat16":
            bf16_runs.append([(o.outputs[0].token_ids, [lp[t].logprob for lp, t in zip(
                o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True)]) for o in outs])
    assert bf16_runs[0] == bf16_runs[1]


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_cuda_graphs_match_eager_across_buckets(kv_cache_dtype: str, tmp_path: Path) -> None:
    # 37 requests of different lengths finishing at different steps: the decode batch grows and
    # shrinks through the buckets (1 .. 48), with padded rows in most steps. A step budget of 64
    # tokens admits the prompts in chunks while earlier requests decode: those steps replay the
    # graph for the decodes and run the prefill chunks (one with prompt logprobs) eagerly.
    save_tiny_model(str(tmp_path), tiny_config("llama"))
    prompts = _prompts(37, seed=1)
    params = [SamplingParams(temperature=0.0, max_tokens=4 + i, ignore_eos=True, logprobs=1,
                             prompt_logprobs=1 if i == 20 else None) for i in range(37)]
    results = {}
    for eager in (True, False):
        with LLM(str(tmp_path), device="cuda", dtype="float32", kv_cache_memory_gb=0.05,
                 kv_cache_dtype=kv_cache_dtype, enforce_eager=eager, max_num_seqs=48,
                 max_num_batched_tokens=64) as llm:
            results[eager] = llm.generate(prompts, params)
    # A graph pads the batch to its bucket, so its GEMMs may round differently in the last bit;
    # an int8 pool can turn that into one quantization step of a key (~1e-3 on a logprob).
    tol = 1e-4 if kv_cache_dtype == "auto" else 2e-2
    for got, want in zip(results[False], results[True], strict=True):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        for g, w, tid in zip(got.outputs[0].logprobs, want.outputs[0].logprobs, want.outputs[0].token_ids, strict=True):
            assert g[tid].logprob == pytest.approx(w[tid].logprob, abs=tol)
    got_prompt, want_prompt = results[False][20].prompt_logprobs, results[True][20].prompt_logprobs
    assert got_prompt is not None and len(got_prompt) == len(prompts[20])
    for g, w, tid in zip(got_prompt[1:], want_prompt[1:], prompts[20][1:], strict=True):
        assert g[tid].logprob == pytest.approx(w[tid].logprob, abs=tol)


def test_cuda_graphs_sampled_with_seeds_match_eager(tmp_path: Path) -> None:
    # Random sampling behind a graph: seeded requests give the same text as eager ones. Every
    # launch is checked not to wait for the GPU (`check_launch_syncs`), with penalties, min_p,
    # logprobs and n = 2 among the requests.
    save_tiny_model(str(tmp_path), tiny_config("qwen2"))
    prompts = _prompts(6, seed=2)
    params = [SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=7, max_tokens=12, ignore_eos=True)] * 3
    params += [
        SamplingParams(temperature=0.9, min_p=0.05, seed=3, frequency_penalty=1.0, presence_penalty=0.5,
                       repetition_penalty=1.3, max_tokens=12, ignore_eos=True, logprobs=3),
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2, min_tokens=4),
        SamplingParams(temperature=1.0, seed=5, n=2, max_tokens=12, ignore_eos=True),
    ]
    outs = {}
    for eager in (True, False):
        with LLM(str(tmp_path), device="cuda", dtype="float32", kv_cache_memory_gb=0.05, enforce_eager=eager,
                 check_launch_syncs=True) as llm:
            outs[eager] = [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params)]
    assert outs[True] == outs[False]


def test_prefill_graphs_match_eager(tmp_path: Path) -> None:
    # Packed steps replay a graph per token bucket up to max_prefill_graph_tokens (2048) and run
    # eagerly past it. Prompts of 1 to 3000 tokens under a 2500-token budget give steps in most
    # buckets, chunks past the last bucket, chunks with decodes beside them and placeholders;
    # a second round of prompts that extend the first round's hits the prefix cache (new tokens
    # after a cached prefix, in a graphed step); one request asks for prompt logprobs. No launch
    # waits for the GPU but to read those back (`check_launch_syncs`). Mixed steps run as one
    # pass (their decodes through the decode kernel) and, with fuse_mixed_steps off, as a decode
    # graph plus a packed pass: the same tokens.
    save_tiny_model(str(tmp_path), tiny_config("llama", max_position_embeddings=4096))
    rng = random.Random(3)
    lens = [1, 2, 15, 16, 17, 127, 129, 600, 1100, 2100, 3000]
    first = [[rng.randrange(3, 256) for _ in range(n)] for n in lens]
    second = [p + [rng.randrange(3, 256) for _ in range(rng.randrange(1, 300))] for p in first[5:]]
    params = [SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=1,
                             prompt_logprobs=1 if i == 7 else None) for i in range(len(lens))]
    second_params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=1)
    results = {}
    for graph_tokens, fuse in ((0, True), (2048, True), (2048, False)):
        with LLM(str(tmp_path), device="cuda", dtype="float32", kv_cache_memory_gb=0.2, max_num_seqs=16,
                 max_num_batched_tokens=2500, max_prefill_graph_tokens=graph_tokens, fuse_mixed_steps=fuse,
                 check_launch_syncs=True) as llm:
            assert llm.core.worker_info.graph_token_counts[-1:] == ([2048] if graph_tokens else [])
            outs = llm.generate(first, params)
            outs += llm.generate(second, second_params)
            results[graph_tokens, fuse] = outs
    assert sum(o.num_cached_tokens for o in results[2048, True]) > 0
    for got, want, unfused in zip(results[2048, True], results[0, True], results[2048, False], strict=True):
        assert unfused.outputs[0].token_ids == want.outputs[0].token_ids
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        for g, w, tid in zip(got.outputs[0].logprobs, want.outputs[0].logprobs, want.outputs[0].token_ids,
                             strict=True):
            assert g[tid].logprob == pytest.approx(w[tid].logprob, abs=1e-4)
    got_prompt, want_prompt = results[2048, True][7].prompt_logprobs, results[0, True][7].prompt_logprobs
    assert got_prompt is not None and want_prompt is not None and len(got_prompt) == lens[7]
    for g, w, tid in zip(got_prompt[1:], want_prompt[1:], first[7][1:], strict=True):
        assert g[tid].logprob == pytest.approx(w[tid].logprob, abs=1e-4)


@pytest.mark.parametrize("next_", [False, True], ids=["llava", "llava-next"])
def test_gpu_llava_greedy_matches_cpu(tmp_path: Path, next_: bool) -> None:
    """LLaVA 1.5 and LLaVA-NeXT (any-resolution tiles) with one, two and no images (a repeated
    image from the prefix cache), prefill chunks of 16 tokens cut inside the images: the image
    steps eager, the decodes graphed."""
    from tests.engine.models.test_llava import save_tiny_llava
    from tests.engine.test_llava_engine import _requests

    save_tiny_llava(tmp_path, next_=next_)
    prompts, images = _requests(tmp_path)
    _check_images_greedy(tmp_path, prompts, images)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_gpu_qwen2_vl_greedy_matches_cpu(tmp_path: Path, family: str) -> None:
    """Qwen2-VL / Qwen2.5-VL with one, two and no images (a repeated image from the prefix cache),
    prefill chunks of 16 tokens cut inside the images: the steps with image tokens eager (M-RoPE's
    [3, T] positions rotated in torch), the text chunks after an image through the prefill graphs
    and the decodes through the decode graphs at their shifted positions (the Triton rotary)."""
    from tests.engine.models.test_qwen2_vl import save_tiny_qwen2_vl
    from tests.engine.test_qwen2_vl_engine import requests_with_images

    save_tiny_qwen2_vl(tmp_path, family)
    prompts, images = requests_with_images(tmp_path)
    _check_images_greedy(tmp_path, prompts, images)


def _check_images_greedy(model_dir: Path, prompts: Any, images: Any) -> None:
    """The GPU's greedy tokens with images against the CPU's fp32 ones: fp32 eager and graphed, bf16
    graphed, prefill chunks of 16 tokens (cut inside the images)."""
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=5)
    with LLM(str(model_dir), device="cpu", dtype="float32", kv_cache_memory_gb=0.01) as cpu:
        expected = cpu.generate(prompts, params, images=images)
    for dtype, eager in (("float32", True), ("float32", False), ("bfloat16", False)):
        with LLM(str(model_dir), device="cuda", dtype=dtype, kv_cache_memory_gb=0.05, enforce_eager=eager,
                 max_num_batched_tokens=16) as gpu:
            outs = gpu.generate(prompts, params, images=images)
        for out, ref in zip(outs, expected, strict=True):
            _check_greedy(out.outputs[0], ref.outputs[0], dtype, ("triton", eager))
