"""Llama / Mistral / Qwen2 / Qwen3 / Phi-3 against the transformers implementation (fp32, CPU, random weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from engine.layers import cpu_gemm
from engine.models import load_model
from engine.models.quantize import quantize_model_weights
from tests.engine.models.family_checks import *  # noqa: F403
from tests.engine.models.harness import Harness, rel_err, save_tiny_model, tiny_config

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "llama-bias-headdim": ("llama", {"attention_bias": True, "mlp_bias": True, "head_dim": 24}),
    "llama-rope-linear": (
        "llama",
        {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}},
    ),
    "llama-rope-llama3": (
        "llama",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
                "rope_theta": 500000.0,
            },
            "head_dim": 64,
        },
    ),
    "mistral-sliding": ("mistral", {"sliding_window": 6}),
    "qwen2-tied": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "phi3": ("phi3", {}),
    "phi3-sliding-partial": ("phi3", {"sliding_window": 6, "partial_rotary_factor": 0.5}),
    "qwen3-sliding-tied": ("qwen3", {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1,
                                     "tie_word_embeddings": True}),
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


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_qwen2_has_qkv_bias_and_tied_head(tmp_path: Path) -> None:
    save_tiny_model(str(tmp_path), tiny_config("qwen2"))
    model: Any = load_model(str(tmp_path), torch.float32, "cpu")
    attn = model.model.layers[0].self_attn
    assert attn.qkv_proj.bias is not None and attn.o_proj.bias is None
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_mistral_sliding_window_reaches_attention(tmp_path: Path) -> None:
    save_tiny_model(str(tmp_path), tiny_config("mistral", sliding_window=6))
    model: Any = load_model(str(tmp_path), torch.float32, "cpu")
    assert all(layer.self_attn.attn.sliding_window == 6 for layer in model.model.layers)


def test_phi3_fused_checkpoint_and_sliding_window(tmp_path: Path) -> None:
    save_tiny_model(str(tmp_path), tiny_config("phi3", sliding_window=6, partial_rotary_factor=0.5))
    model: Any = load_model(str(tmp_path), torch.float32, "cpu")
    assert all(layer.self_attn.attn.sliding_window == 6 for layer in model.model.layers)
    assert model.model.layers[0].self_attn.rotary_emb.rotary_dim == 8  # half of a head of 16


def test_phi3_long_context_scaling_is_refused_at_load(tmp_path: Path) -> None:
    factors = [1.0] * 8  # one per rotated frequency (head 16: 8)
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": factors, "long_factor": factors,
            "original_max_position_embeddings": 128}
    save_tiny_model(str(tmp_path), tiny_config("phi3", rope_parameters=rope))
    with pytest.raises(ValueError, match="longrope"):
        load_model(str(tmp_path), torch.float32, "cpu")


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_weight_quantization_on_its_own_grid_costs_what_bf16_costs(method: str, tmp_path: Path) -> None:
    """Weights already on the method's grid (as a Q4_1 GGUF's are for int4) survive int8 / int4
    quantization of the bf16 model up to bf16 rounding: prefill rows (the dense copy of the
    dequantized weights) and decode rows (the int8 / int4 kernels) stay as close to the float32
    model as plain bf16 does (1-2 % here)."""
    save_tiny_model(str(tmp_path), tiny_config("llama"))
    exact: Any = load_model(str(tmp_path), torch.float32, "cpu")
    model: Any = load_model(str(tmp_path), torch.bfloat16, "cpu")
    if not cpu_gemm.can_quantize(model.model.layers[0].mlp.down_proj.weight, method):
        pytest.skip("this torch build has no oneDNN packing for bf16")
    to_grid = cpu_gemm.quantize_int8 if method == "int8" else cpu_gemm.quantize_int4
    for (name, ours), theirs in zip(model.named_modules(), exact.modules(), strict=True):
        if name.endswith(("qkv_proj", "o_proj", "gate_up_proj", "down_proj")):
            theirs.weight.data.copy_(to_grid(theirs.weight.data)[2])
            ours.weight.data.copy_(theirs.weight.data)
    cpu_gemm.pack_model_weights(exact)  # the packed copies follow the new weights
    cpu_gemm.pack_model_weights(model)
    assert quantize_model_weights(model, method) == 2 * 4  # qkv, o, gate_up, down per layer
    prompt = _prompt(16, seed=6)
    expected = Harness(exact).prefill(0, prompt)
    harness = Harness(model)
    prefill = harness.prefill(0, prompt[:12])
    decode = torch.cat([harness.step([(0, [token])])[0] for token in prompt[12:]])
    assert rel_err(prefill, expected[:12]) < 4e-2
    assert rel_err(decode, expected[12:]) < 4e-2
