"""Mixtral / Qwen2-MoE / Qwen3-MoE against the transformers implementation (fp32, CPU, random
weights), and the expert weights' loading (per-expert and stacked checkpoints)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from engine.layers.moe import SparseMoeBlock
from engine.models import load_model
from tests.engine.models.family_checks import *  # noqa: F403
from tests.engine.models.harness import Harness, rel_err, save_tiny_model, tiny_config

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": ("mixtral", {}),
    "mixtral-sliding": ("mixtral", {"sliding_window": 6}),
    "qwen2-moe-shared-dense": ("qwen2_moe", {}),
    "qwen2-moe-sparse-step-norm": ("qwen2_moe", {"mlp_only_layers": [], "decoder_sparse_step": 2,
                                                 "norm_topk_prob": True, "num_experts_per_tok": 3}),
    "qwen3-moe": ("qwen3_moe", {}),
    "qwen3-moe-no-renorm": ("qwen3_moe", {"norm_topk_prob": False, "mlp_only_layers": [0]}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[nn.Module, nn.Module]:
    """(transformers model, our model loaded from its saved directory)."""
    kind, overrides = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    hf = save_tiny_model(str(path), tiny_config(kind, **overrides))
    return hf, load_model(str(path), torch.float32, "cpu")


def test_qwen2_moe_layers_follow_the_config(tmp_path: Path) -> None:
    """mlp_only_layers keeps layer 1 dense; layer 0 has its shared expert and gate."""
    save_tiny_model(str(tmp_path), tiny_config("qwen2_moe"))
    model: Any = load_model(str(tmp_path), torch.float32, "cpu")
    sparse, dense = (layer.mlp for layer in model.model.layers)
    assert isinstance(sparse, SparseMoeBlock) and not isinstance(dense, SparseMoeBlock)
    assert sparse.shared_expert is not None and sparse.shared_expert_gate is not None
    assert sparse.experts.gate_up.weight.shape == (8, 2 * 32, 64)
    assert sparse.experts.down.weight.shape == (8, 64, 32)
    assert model.model.layers[0].self_attn.qkv_proj.bias is not None


def test_mixtral_expert_weights_land_in_their_slots(tmp_path: Path) -> None:
    hf = save_tiny_model(str(tmp_path), tiny_config("mixtral"))
    model: Any = load_model(str(tmp_path), torch.float32, "cpu")
    theirs = hf.model.layers[1].mlp.experts  # transformers stacks them as [E, 2I, H] / [E, H, I]
    ours = model.model.layers[1].mlp.experts
    assert torch.equal(ours.gate_up.weight, theirs.gate_up_proj)
    assert torch.equal(ours.down.weight, theirs.down_proj)
    assert torch.equal(model.model.layers[1].mlp.gate.weight, hf.model.layers[1].mlp.gate.weight)


def test_stacked_expert_checkpoint_loads_like_per_expert_one(tmp_path: Path) -> None:
    """A checkpoint that stores `mlp.experts.gate_up_proj` / `down_proj` stacked gives the model
    that the per-expert checkpoint gives."""
    import safetensors.torch

    per_expert = tmp_path / "per_expert"
    save_tiny_model(str(per_expert), tiny_config("qwen3_moe"))
    reference: Any = load_model(str(per_expert), torch.float32, "cpu")
    tensors = safetensors.torch.load_file(str(per_expert / "model.safetensors"))
    stacked = {k: v for k, v in tensors.items() if ".experts." not in k}
    for i, layer in enumerate(reference.model.layers):
        prefix = f"model.layers.{i}.mlp.experts"
        stacked[f"{prefix}.gate_up_proj"] = layer.mlp.experts.gate_up.weight.clone()
        stacked[f"{prefix}.down_proj"] = layer.mlp.experts.down.weight.clone()
    stacked_dir = tmp_path / "stacked"
    stacked_dir.mkdir()
    (stacked_dir / "config.json").write_text((per_expert / "config.json").read_text())
    safetensors.torch.save_file(stacked, str(stacked_dir / "model.safetensors"))
    model: Any = load_model(str(stacked_dir), torch.float32, "cpu")
    for ours, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(ours, theirs)


def test_missing_expert_fails_the_load(tmp_path: Path) -> None:
    import safetensors.torch

    save_tiny_model(str(tmp_path), tiny_config("mixtral"))
    file = str(tmp_path / "model.safetensors")
    tensors = safetensors.torch.load_file(file)
    del tensors["model.layers.0.block_sparse_moe.experts.5.w3.weight"]
    safetensors.torch.save_file(tensors, file)
    with pytest.raises(ValueError, match="no weights"):
        load_model(str(tmp_path), torch.float32, "cpu")


def test_packed_cpu_experts_compute_what_plain_ones_do(tmp_path: Path) -> None:
    """bf16 on the CPU: the experts' oneDNN-packed weights (packed at load) give the plain
    products' logits, up to bf16 rounding."""
    save_tiny_model(str(tmp_path), tiny_config("mixtral"))
    model: Any = load_model(str(tmp_path), torch.bfloat16, "cpu")
    experts = [layer.mlp.experts for layer in model.model.layers]
    if experts[0].packed is None:
        pytest.skip("this torch build has no oneDNN packing for bf16")
    prompt = list(range(3, 40, 3))
    packed = Harness(model).prefill(0, prompt)
    for e in experts:
        e.packed = None
    assert rel_err(packed, Harness(model).prefill(0, prompt)) < 1e-2
