"""StableLM against the transformers implementation (fp32, CPU, random weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from engine.models import load_model
from tests.engine.models.family_checks import *  # noqa: F403
from tests.engine.models.harness import save_tiny_model, tiny_config

CASES: dict[str, dict[str, Any]] = {
    "stablelm": {"qk_layernorm": False},  # rotary on a quarter of each head, sequential residual
    "stablelm-qkv-bias-parallel": {"use_qkv_bias": True, "use_parallel_residual": True, "tie_word_embeddings": True,
                                   "qk_layernorm": False},
    "stablelm-qk-layernorm": {"qk_layernorm": True, "partial_rotary_factor": 0.5},
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[nn.Module, nn.Module]:
    """(transformers model, our model loaded from its saved directory)."""
    path = tmp_path_factory.mktemp(request.param)
    hf = save_tiny_model(str(path), tiny_config("stablelm", **CASES[request.param]))
    return hf, load_model(str(path), torch.float32, "cpu")


def test_stablelm_variants_reach_the_layers(tmp_path: Path) -> None:
    config = tiny_config("stablelm", qk_layernorm=True, use_qkv_bias=True, use_parallel_residual=True)
    save_tiny_model(str(tmp_path), config)
    model: Any = load_model(str(tmp_path), torch.float32, "cpu")
    layer = model.model.layers[0]
    assert layer.self_attn.qkv_proj.bias is not None and layer.self_attn.o_proj.bias is None
    assert layer.post_attention_layernorm is None and layer.input_layernorm.bias is not None
    assert tuple(layer.self_attn.q_norm.weight.shape) == (4, 16)  # [heads, head_dim]
    assert tuple(layer.self_attn.k_norm.weight.shape) == (2, 16)
    assert layer.self_attn.rotary_emb.rotary_dim == 4  # the default quarter of a head of 16


def test_missing_per_head_norms_are_reported(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    save_tiny_model(str(tmp_path), tiny_config("stablelm", qk_layernorm=True))
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.0.self_attn.q_layernorm.norms.3.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="per-head norms"):
        load_model(str(tmp_path), torch.float32, "cpu")
