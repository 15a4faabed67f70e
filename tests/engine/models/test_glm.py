"""GLM (`GlmForCausalLM`, `Glm4ForCausalLM`) and ChatGLM2 / ChatGLM3 / GLM-4 against transformers (fp32, CPU, random weights).

transformers has no ChatGLM class (its checkpoints ship remote code, never run here): the
reference is transformers' `GlmForCausalLM`, the same architecture, whose weights the test
writes under ChatGLM's names and fused layouts (`remote_families.save_chatglm`), an exact
conversion. Both rotate half of each head in interleaved pairs, which the loader permutes into
the engine's `rotate_half` layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from engine.models import load_hf_config, load_model
from tests.engine.models.family_checks import *  # noqa: F403
from tests.engine.models.remote_families import save_chatglm, save_glm

CASES: dict[str, tuple[Any, dict[str, Any]]] = {
    "glm": (save_glm, {}),
    "glm-kv1": (save_glm, {"num_key_value_heads": 1}),
    "glm4": (save_glm, {"glm4": True}),  # Glm4ForCausalLM: norms after attention and MLP
    "chatglm": (save_chatglm, {}),
    # GLM-4's rope_ratio 500 (a rotary base of 5e6); one multi-query group
    "chatglm-rope-ratio-kv1": (save_chatglm, {"num_key_value_heads": 1, "rope_parameters": {
        "rope_type": "default", "rope_theta": 5e6, "partial_rotary_factor": 0.5}}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, nn.Module]:
    """(transformers GlmForCausalLM, our model loaded from the family's checkpoint)."""
    save, overrides = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    hf = save(path, **overrides)
    return hf, load_model(str(path), torch.float32, "cpu")


def test_chatglm_config_gets_the_standard_names(tmp_path: Path) -> None:
    save_chatglm(tmp_path)
    config = load_hf_config(str(tmp_path))
    assert (config.num_hidden_layers, config.vocab_size, config.intermediate_size) == (2, 256, 128)
    assert (config.head_dim, config.num_key_value_heads, config.max_position_embeddings) == (16, 2, 512)
    assert config.rms_norm_eps == 1e-5 and config.attention_bias is True
    model: Any = load_model(str(tmp_path), torch.float32, "cpu")
    attn = model.model.layers[0].self_attn
    assert attn.rotary_emb.rotary_dim == 8  # half of each head of 16 rotates
    assert attn.qkv_proj.bias is not None and attn.o_proj.bias is None


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("rmsnorm", False, "rmsnorm=False"),
        ("add_bias_linear", True, "add_bias_linear=True"),
        ("position_encoding_2d", True, "first version"),
    ],
)
def test_chatglm_variants_with_other_layers_are_refused(tmp_path: Path, field: str, value: Any, message: str) -> None:
    import json

    save_chatglm(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load_model(str(tmp_path), torch.float32, "cpu")
