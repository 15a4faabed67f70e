"""Checkpoints stored in FP8 (per-row and block scales) load and serve in FP8."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.layers.fp8 import FP8_DTYPE, quantize_fp8_rows
from engine.models import load_model
from tests.engine.models.harness import Harness, rel_err, save_tiny_model, tiny_config

_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_COMPRESSED = {
    "quant_method": "compressed-tensors",
    "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"type": "float", "num_bits": 8,
                                                                     "strategy": "channel"}}},
    "ignore": ["lm_head"],
}
_BLOCK = 32
_FINE_GRAINED = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [_BLOCK, _BLOCK]}


def _quantize_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (fp8 [N, K], scale grid [N / B, K / B]) as block-scaled checkpoints store them."""
    rows, cols = weight.shape
    blocks = weight.reshape(rows // _BLOCK, _BLOCK, cols // _BLOCK, _BLOCK)
    scale = blocks.abs().amax(dim=(1, 3)) / 448.0
    q = (blocks / scale[:, None, :, None]).clamp(-448, 448).reshape(rows, cols).to(FP8_DTYPE)
    return q, scale


def _write_fp8_checkpoint(source: Path, out: Path, quant: dict[str, Any]) -> dict[str, torch.Tensor]:
    """`source`'s checkpoint with its linear weights stored in FP8; returns the dequantized weights."""
    out.mkdir()
    tensors = load_file(str(source / "model.safetensors"))
    dequantized: dict[str, torch.Tensor] = {}
    for name in list(tensors):
        if name.endswith(".weight") and any(f".{part}." in name for part in _LINEAR):
            module = name[: -len(".weight")]
            rows, cols = tensors[name].shape
            if quant["quant_method"] == "fp8":
                q, scale = _quantize_blocks(tensors[name])
                tensors[f"{module}.weight_scale_inv"] = scale
                blocks = q.float().reshape(rows // _BLOCK, _BLOCK, cols // _BLOCK, _BLOCK)
                dequantized[name] = (blocks * scale[:, None, :, None]).reshape(rows, cols)
            else:
                q, scale = quantize_fp8_rows(tensors[name])
                tensors[f"{module}.weight_scale"] = scale
                tensors[f"{module}.input_scale"] = torch.ones(1)  # static activation scales are not used
                dequantized[name] = q.float() * scale
            tensors[name] = q
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = quant
    (out / "config.json").write_text(json.dumps(config))
    return dequantized


@pytest.mark.parametrize("quant", [_COMPRESSED, _FINE_GRAINED], ids=["per-row", "block"])
def test_an_fp8_checkpoint_serves_what_its_stored_values_say(tmp_path: Path, quant: dict[str, Any]) -> None:
    """Oracle: the same architecture loaded from its dequantized weights, quantized to FP8 at load."""
    save_tiny_model(str(tmp_path / "float"), tiny_config("llama", initializer_range=0.02))
    dequantized = _write_fp8_checkpoint(tmp_path / "float", tmp_path / "fp8", quant)
    plain = load_file(str(tmp_path / "float" / "model.safetensors"))
    (tmp_path / "deq").mkdir()
    save_file({**plain, **dequantized}, str(tmp_path / "deq" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "deq" / "config.json").write_text((tmp_path / "float" / "config.json").read_text())

    model: Any = load_model(str(tmp_path / "fp8"), torch.float32, "cpu")
    assert model.model.layers[0].self_attn.qkv_proj.weight.dtype == FP8_DTYPE
    expected_model: Any = load_model(str(tmp_path / "deq"), torch.float32, "cpu", quantization="fp8")
    prompt = list(range(3, 30))
    actual = Harness(model).prefill(0, prompt)
    assert rel_err(actual, Harness(expected_model).prefill(0, prompt)) < 1e-5
    exact = Harness(load_model(str(tmp_path / "float"), torch.float32, "cpu")).prefill(0, prompt)
    assert rel_err(actual, exact) < 0.06  # and near the float weights it was made from


def test_an_fp8_weight_without_its_scale_is_refused(tmp_path: Path) -> None:
    save_tiny_model(str(tmp_path / "float"), tiny_config("llama"))
    _write_fp8_checkpoint(tmp_path / "float", tmp_path / "fp8", _COMPRESSED)
    path = tmp_path / "fp8" / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["model.layers.0.mlp.down_proj.weight_scale"]
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="without a scale"):
        load_model(str(tmp_path / "fp8"), torch.float32, "cpu")
