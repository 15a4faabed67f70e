"""MiniCPM 1 / 2 against transformers (fp32, CPU, random weights); MiniCPM3 is refused.

transformers has no MiniCPM class (its checkpoints ship remote code, never run here): the
reference is transformers' Llama loaded with the MiniCPM weights with the muP scalings folded
in (`remote_families.save_minicpm`): embedding x scale_emb, o_proj and down_proj x
scale_depth / sqrt(layers), LM head / (hidden / dim_model_base). The engine applies the
scalings to activations, so the two computations differ and agree only if both are right.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from engine.models import load_model
from tests.engine.models.family_checks import *  # noqa: F403
from tests.engine.models.harness import save_tiny_model
from tests.engine.models.remote_families import save_minicpm

CASES: dict[str, dict[str, Any]] = {
    "minicpm-tied": {},
    "minicpm-untied-mha": {"tie_word_embeddings": False, "num_key_value_heads": 4},
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, nn.Module]:
    """(transformers Llama with the scalings folded in, our model loaded from the MiniCPM checkpoint)."""
    path = tmp_path_factory.mktemp(request.param)
    hf = save_minicpm(path, **CASES[request.param])
    return hf, load_model(str(path), torch.float32, "cpu")


def test_minicpm_ties_its_head_by_default(tmp_path: Path) -> None:
    save_minicpm(tmp_path)
    model: Any = load_model(str(tmp_path), torch.float32, "cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.scale_emb == 12.0 and model.logit_divisor == 2.0


def test_minicpm3_is_refused_at_load_naming_mla(tmp_path: Path) -> None:
    from transformers import MiniCPM3Config

    config = MiniCPM3Config(architectures=["MiniCPM3ForCausalLM"], vocab_size=256, hidden_size=64,
                            intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=4, max_position_embeddings=512)
    save_tiny_model(str(tmp_path), config)
    with pytest.raises(ValueError, match="multi-head latent attention.*issue 22"):
        load_model(str(tmp_path), torch.float32, "cpu")
