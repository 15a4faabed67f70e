"""BLOOM against transformers' `BloomForCausalLM` (fp32, CPU, random weights): the shared family
checks, ALiBi's slopes, the per-head fused q/k/v split over ranks, bare `BloomModel` checkpoints."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from engine import LLM, SamplingParams
from engine.layers.alibi import alibi_slopes, rank_alibi_slopes
from engine.models import load_model
from engine.models.bloom import BloomForCausalLM
from engine.worker.kv_pool import kv_bytes_per_token
from tests.engine.models.family_checks import *  # noqa: F403
from tests.engine.models.harness import Harness, rel_err, save_tiny_model, tiny_config

CASES: dict[str, dict[str, Any]] = {
    "bloom": {},  # 4 heads of 16, tied LM head
    "bloom-6-heads": {"num_attention_heads": 6, "hidden_size": 96},  # slopes of a non power of two
    "bloom-12-heads-untied": {"num_attention_heads": 12, "hidden_size": 192, "tie_word_embeddings": False},
    "bloom-residual-after-norm": {"apply_residual_connection_post_layernorm": True, "num_hidden_layers": 3},
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[nn.Module, nn.Module]:
    """(transformers model, our model loaded from its saved directory)."""
    path = tmp_path_factory.mktemp(request.param)
    hf = save_tiny_model(str(path), tiny_config("bloom", **CASES[request.param]))
    return hf, load_model(str(path), torch.float32, "cpu")


@pytest.mark.parametrize("num_heads", [*range(1, 41), 48, 64, 80, 96, 112, 128])
def test_alibi_slopes_equal_transformers(num_heads: int) -> None:
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    expected = _get_alibi_slopes(num_heads, torch.device("cpu"))
    assert torch.equal(alibi_slopes(num_heads), expected)  # bit for bit, float32


def test_each_rank_takes_the_slopes_of_its_heads() -> None:
    whole = alibi_slopes(12)
    parts = [rank_alibi_slopes(12, rank, 4) for rank in range(4)]
    assert all(p.shape == (3,) for p in parts)
    assert torch.equal(torch.cat(parts), whole)
    with pytest.raises(ValueError, match="do not split"):
        rank_alibi_slopes(6, 0, 4)


def test_fused_qkv_rows_of_each_rank_come_from_its_heads(tmp_path: Path) -> None:
    config = tiny_config("bloom", num_attention_heads=6, hidden_size=96)
    hf: Any = save_tiny_model(str(tmp_path), config)
    checkpoint = hf.transformer.h[0].self_attention.query_key_value
    per_head_w = checkpoint.weight.view(6, 3, 16, 96)  # BLOOM's [H, 3, D] rows
    per_head_b = checkpoint.bias.view(6, 3, 16)
    for rank in range(3):
        model: Any = BloomForCausalLM(config, tp_rank=rank, tp_size=3)
        qkv = model.transformer.h[0].self_attention.query_key_value
        qkv.weight_loader(qkv.weight, checkpoint.weight.detach())
        qkv.weight_loader(qkv.bias, checkpoint.bias.detach())
        heads = slice(2 * rank, 2 * rank + 2)
        for part, name in enumerate("qkv"):
            expected_w = per_head_w[heads, part].reshape(32, 96)
            expected_b = per_head_b[heads, part].reshape(32)
            assert torch.equal(qkv.weight[32 * part : 32 * (part + 1)], expected_w), name
            assert torch.equal(qkv.bias[32 * part : 32 * (part + 1)], expected_b), name
        attn = model.transformer.h[0].self_attention.attn
        assert torch.equal(attn.alibi_slopes, alibi_slopes(6)[heads])


@torch.inference_mode()
def test_checkpoint_without_the_transformer_prefix_loads(tmp_path: Path) -> None:
    """Many BLOOM checkpoints were saved from the bare `BloomModel`: `h.0....`, no lm_head."""
    hf = save_tiny_model(str(tmp_path), tiny_config("bloom"))
    file = tmp_path / "model.safetensors"
    tensors = load_file(str(file))
    assert "transformer.word_embeddings.weight" in tensors
    bare = {name.removeprefix("transformer."): t for name, t in tensors.items() if not name.startswith("lm_head.")}
    save_file(bare, str(file), metadata={"format": "pt"})
    model = load_model(str(tmp_path), torch.float32, "cpu")
    prompt = list(range(3, 60, 4))
    assert rel_err(Harness(model).prefill(0, prompt), hf(torch.tensor([prompt])).logits[0]) < 1e-4


def test_attention_carries_the_slopes_and_no_rotary(tmp_path: Path) -> None:
    save_tiny_model(str(tmp_path), tiny_config("bloom"))
    model: Any = load_model(str(tmp_path), torch.float32, "cpu")
    attns = [layer.self_attention.attn for layer in model.transformer.h]
    assert all(a.alibi_slopes is attns[0].alibi_slopes for a in attns)  # one tensor for every layer
    assert torch.equal(attns[0].alibi_slopes, alibi_slopes(4))
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    assert not any("rotary" in name for name, _ in model.named_modules())


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_served_outputs_equal_with_prefix_cache_on_and_off(kv_cache_dtype: str, tmp_path: Path) -> None:
    """The engine end to end: shared system prompts, chunked prefill and a pool small enough to
    preempt; ALiBi's bias over a cached prefix is the one a fresh prefill computes."""
    save_tiny_model(str(tmp_path), tiny_config("bloom", num_attention_heads=6, hidden_size=96))
    rng = random.Random(7)
    systems = [[rng.randrange(3, 256) for _ in range(24)] for _ in range(2)]
    prompts = [systems[i % 2] + [rng.randrange(3, 256) for _ in range(rng.randrange(1, 20))] for i in range(8)]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, n=2)
    per_token = kv_bytes_per_token(2, 6, 16, torch.int8 if kv_cache_dtype == "int8" else torch.float32)
    results = {}
    for enabled in (False, True):
        with LLM(str(tmp_path), dtype="float32", kv_cache_dtype=kv_cache_dtype,
                 kv_cache_memory_gb=160 * per_token / (1 << 30), max_num_batched_tokens=16,
                 admission="aggressive", enable_prefix_caching=enabled) as llm:
            results[enabled] = [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params)]
            if enabled:
                assert llm.core.stats().prefix_cache_hits > 0 and llm.core.scheduler.num_preemptions > 0
    assert results[True] == results[False]


@torch.inference_mode()
def test_pytorch_bin_checkpoint_without_the_prefix_loads(tmp_path: Path) -> None:
    """bigscience's BLOOM repositories were published as `pytorch_model.bin` from `BloomModel`."""
    hf = save_tiny_model(str(tmp_path / "st"), tiny_config("bloom"))
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if not k.startswith("lm_head.")}
    hf.config.save_pretrained(str(tmp_path / "bin"))
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    model = load_model(str(tmp_path / "bin"), torch.float32, "cpu")
    prompt = list(range(3, 60, 4))
    assert rel_err(Harness(model).prefill(0, prompt), hf(torch.tensor([prompt])).logits[0]) < 1e-4
