"""InternLM2 / 2.5 and InternLM3 against transformers (fp32, CPU, random weights).

transformers has no InternLM2 class (its checkpoints ship remote code, never run here): the
reference is transformers' Llama, whose q / k / v the test packs into InternLM2's grouped
`wqkv` and whose names it renames (`remote_families.save_internlm2`), an exact conversion.
InternLM3 is transformers' own config class, which builds a Llama.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from engine.models import load_hf_config, load_model
from tests.engine.models.family_checks import *  # noqa: F403
from tests.engine.models.remote_families import save_internlm2, save_internlm3

_DYNAMIC = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1000000.0}
CASES: dict[str, tuple[Any, dict[str, Any]]] = {
    "internlm2": (save_internlm2, {}),
    "internlm2-bias-mha": (save_internlm2, {"attention_bias": True, "num_key_value_heads": 4}),
    "internlm2-kv1-dynamic": (save_internlm2, {"num_key_value_heads": 1, "rope_parameters": _DYNAMIC}),
    "internlm3": (save_internlm3, {}),
    "internlm3-bias-dynamic": (save_internlm3, {"qkv_bias": True, "bias": True,
                                                "rope_parameters": {**_DYNAMIC, "factor": 6.0}}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, nn.Module]:
    """(transformers Llama, our model loaded from the family's checkpoint)."""
    save, overrides = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    hf = save(path, **overrides)
    return hf, load_model(str(path), torch.float32, "cpu")


def test_internlm2_config_is_read_without_remote_code(tmp_path: Path) -> None:
    save_internlm2(tmp_path, attention_bias=True)
    config = load_hf_config(str(tmp_path))
    assert config.model_type == "internlm2" and config.attention_bias is True
    model: Any = load_model(str(tmp_path), torch.float32, "cpu")
    attn = model.model.layers[0].self_attn
    assert attn.qkv_proj.bias is not None and attn.o_proj.bias is not None
    assert model.model.layers[0].mlp.down_proj.bias is None


def test_internlm2_wqkv_of_the_wrong_size_is_an_error(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    save_internlm2(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    name = "model.layers.0.attention.wqkv.weight"
    tensors[name] = tensors[name][:-16]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="attention.wqkv.weight needs 128 rows"):
        load_model(str(tmp_path), torch.float32, "cpu")
