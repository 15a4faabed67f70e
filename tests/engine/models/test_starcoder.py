"""GPTBigCode (multi-query and multi-head) and StarCoder2 (with and without a sliding window)
against the transformers implementation (fp32, CPU, random weights).

transformers initialises every bias to zero and every LayerNorm to (1, 0); the saved models
here get random biases and norms too, so that a bias or norm parameter loaded into the wrong
place, or not at all, changes the logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from engine.model_config import ModelConfig
from engine.models import load_model
from tests.engine.models.family_checks import *  # noqa: F403
from tests.engine.models.harness import Harness, rel_err, tiny_config

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt_bigcode-mqa": ("gpt_bigcode", {}),
    "gpt_bigcode-mha": ("gpt_bigcode", {"multi_query": False}),
    "gpt_bigcode-mqa-unscaled-gelu": (
        "gpt_bigcode",
        {"scale_attn_weights": False, "activation_function": "gelu", "initializer_range": 0.05},
    ),
    "starcoder2": ("starcoder2", {}),
    "starcoder2-sliding": ("starcoder2", {"sliding_window": 6}),
    "starcoder2-nobias-untied": ("starcoder2", {"use_bias": False, "tie_word_embeddings": False}),
}


def save_random_model(path: str, config: Any, seed: int = 0) -> nn.Module:
    """A random-weight transformers model with random biases and norms, saved to `path`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:  # biases and LayerNorm weights / biases
                base = 1.0 if name.endswith("norm.weight") or ".ln_" in name and name.endswith("weight") else 0.0
                param.copy_(base + 0.1 * torch.randn_like(param))
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[nn.Module, nn.Module]:
    """(transformers model, our model loaded from its saved directory)."""
    kind, overrides = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    hf = save_random_model(str(path), tiny_config(kind, **overrides))
    return hf, load_model(str(path), torch.float32, "cpu")


def test_multi_query_keeps_one_kv_head_and_ties_the_head(tmp_path: Path) -> None:
    save_random_model(str(tmp_path), tiny_config("gpt_bigcode"))
    model: Any = load_model(str(tmp_path), torch.float32, "cpu")
    assert ModelConfig.from_hf_config(model.config).num_kv_heads == 1
    attn = model.transformer.h[0].attn
    assert attn.attn.num_heads == 4 and attn.attn.num_kv_heads == 1
    assert model.lm_head.weight is model.transformer.wte.weight


def test_multi_head_config_has_a_kv_head_per_head(tmp_path: Path) -> None:
    # transformers saves a stale num_key_value_heads (its default head count) in this config.
    save_random_model(str(tmp_path), tiny_config("gpt_bigcode", multi_query=False))
    model: Any = load_model(str(tmp_path), torch.float32, "cpu")
    assert ModelConfig.from_hf_config(model.config).num_kv_heads == 4
    assert model.transformer.h[0].attn.attn.num_kv_heads == 4


def test_starcoder2_sliding_window_reaches_every_layer(tmp_path: Path) -> None:
    save_random_model(str(tmp_path), tiny_config("starcoder2", sliding_window=6))
    model: Any = load_model(str(tmp_path), torch.float32, "cpu")
    assert all(layer.self_attn.attn.sliding_window == 6 for layer in model.model.layers)
    assert model.model.layers[0].self_attn.qkv_proj.bias is not None


@torch.inference_mode()
def test_positions_past_a_prefix_read_their_own_position_embedding(tmp_path: Path) -> None:
    """A sequence decoded after a cached prefix takes wpe at its absolute position: the same
    logits as one prefill of the whole prompt (a position counted from the chunk would differ)."""
    hf = save_random_model(str(tmp_path), tiny_config("gpt_bigcode"))
    model = load_model(str(tmp_path), torch.float32, "cpu")
    prompt = list(range(5, 45))
    harness = Harness(model)
    harness.prefill(0, prompt[:30])
    tail = torch.cat([harness.step([(0, [t])])[0] for t in prompt[30:]])
    expected = hf(torch.tensor([prompt])).logits[0, 30:]
    assert rel_err(tail, expected) < 1e-4


def test_context_past_the_learned_positions_is_refused_at_start(tmp_path: Path) -> None:
    """wpe has max_position_embeddings rows: a longer max_model_len fails before any worker starts;
    a sequence may fill the table to its last row."""
    from engine import LLM, SamplingParams

    save_random_model(str(tmp_path), tiny_config("gpt_bigcode"))  # 512 positions
    with pytest.raises(ValueError, match="max_model_len 513 is past the model's 512 learned positions"):
        LLM(str(tmp_path), dtype="float32", kv_cache_memory_gb=0.01, max_model_len=513)
    with LLM(str(tmp_path), dtype="float32", kv_cache_memory_gb=0.01, max_model_len=512) as llm:
        assert llm.max_model_len == 512
        out = llm.generate([list(range(3, 253)) * 2], SamplingParams(max_tokens=12, ignore_eos=True))
        assert len(out[0].outputs[0].token_ids) == 12  # positions 0 .. 511
