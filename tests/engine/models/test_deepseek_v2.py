"""DeepSeek-V2 (multi-head latent attention; dense MLPs, and mixture-of-experts layers with greedy
or grouped top-k) against transformers (fp32, CPU, random weights), and its latent KV pool."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from engine.layers import ReplicatedLinear
from engine.layers.mla import MLAAttention
from engine.layers.moe import Routing, SparseMoeBlock
from engine.model_config import ModelConfig
from engine.models import load_model
from engine.worker.forward_context import INT8_KV_SCALE_DTYPE
from engine.worker.kv_pool import KVLayout
from tests.engine.models.family_checks import *  # noqa: F403
from tests.engine.models.harness import Harness, rel_err, save_tiny_model, tiny_config

_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0,
         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.707}

_GREEDY = {"topk_method": "greedy", "n_group": None, "topk_group": None, "num_experts_per_tok": 2}

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "q-lora": ("deepseek_v2", {}),
    # plain q_proj; biases on q_a / kv_a / o (kv_a's rotary rows reordered with its weight)
    "no-q-lora-bias": ("deepseek_v2", {"q_lora_rank": None, "attention_bias": True}),
    # DeepSeek's YaRN: frequencies blended, cos / sin and the softmax scale corrected
    "yarn": ("deepseek_v2", {"rope_parameters": _YARN}),
    # mixture of experts after a dense first layer, 2 shared experts (V2-Lite's greedy top-k)
    "moe-greedy": ("deepseek_v2_moe", {**_GREEDY, "routed_scaling_factor": 1.0}),
    # DeepSeek-V2's grouped top-k (best 2 of 4 groups, then top 3), routed weights scaled by 1.5
    "moe-grouped-scaled": ("deepseek_v2_moe", {}),
    # norm_topk_prob set (transformers leaves it unused), one shared expert, every layer MoE
    "moe-norm-topk-all-layers": ("deepseek_v2_moe", {**_GREEDY, "norm_topk_prob": True, "n_shared_experts": 1,
                                                     "routed_scaling_factor": 2.0, "first_k_dense_replace": 0}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, nn.Module]:
    """(transformers model, our model loaded from its saved directory)."""
    kind, overrides = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    hf = save_tiny_model(str(path), tiny_config(kind, **overrides))
    return hf, load_model(str(path), torch.float32, "cpu")


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("absorbed", [True, False])
@torch.inference_mode()
def test_absorbed_and_expanded_forms_match_transformers(
    pair: tuple[nn.Module, nn.Module], absorbed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Either form for every sequence of a packed step (prefill and a chunk over a cached
    prefix): the same logits as transformers."""
    hf, ours = pair
    monkeypatch.setattr(MLAAttention, "_absorbed_is_cheaper", lambda self, n, length: absorbed)
    prompt = _prompt(19, seed=7)
    expected = hf(torch.tensor([prompt])).logits[0]
    harness = Harness(ours)
    actual = torch.cat([harness.step([(0, prompt[:11])])[0], harness.step([(0, prompt[11:])])[0]])
    assert rel_err(actual, expected) < 1e-4


def test_the_cheaper_form_is_chosen_per_sequence() -> None:
    # DeepSeek-V2-Lite's sizes: a decode or a short chunk over a long prefix absorbs, a prefill expands
    attn = MLAAttention(16, 512, 128, 64, 128, 0.1, 0, ReplicatedLinear(512, 16 * 256, False))
    assert attn._absorbed_is_cheaper(1, 4096) and attn._absorbed_is_cheaper(64, 4096)
    assert not attn._absorbed_is_cheaper(2048, 2048) and not attn._absorbed_is_cheaper(1024, 4096)


def test_kv_pool_holds_one_latent_per_token_and_layer(tmp_path: Path) -> None:
    """A token costs kv_lora_rank + qk_rope_head_dim values per layer (one int8 scale with
    int8), on every tensor-parallel rank: the KV capacity for a given memory follows."""
    config = tiny_config("deepseek_v2", num_hidden_layers=3)
    shape = ModelConfig.from_hf_config(config)
    assert shape.kv_latent_dim == 32 + 16
    for tp in (1, 2):
        layout = KVLayout.for_model(shape, tp, torch.bfloat16)
        assert layout.bytes_per_token() == 3 * 48 * 2
        assert layout.bytes_per_token(torch.int8) == 3 * (48 + INT8_KV_SCALE_DTYPE.itemsize)
    # the same model with per-head K and V (4 heads of qk 32 / v 24, padded to 32) would need
    # 2 * 4 * 32 values per layer: 48 of them hold 5.3x the tokens
    pool = KVLayout.for_model(shape, 1, torch.int8).allocate(10, "cpu")
    assert [tuple(k.shape) for k in pool.k] == [(11, 1, 48)] * 3 and pool.v == [] and pool.v_scale is None
    assert pool.k_scale is not None and tuple(pool.k_scale[0].shape) == (11, 1)

    from engine import LLM

    save_tiny_model(str(tmp_path), config)
    budget = 1000 * 3 * 48 * 4  # bytes for 1 000 float32 tokens
    with LLM(str(tmp_path), dtype="float32", kv_cache_memory_gb=budget / (1 << 30)) as llm:
        assert llm.kv_cache_tokens == 1000


def test_moe_layers_follow_the_config() -> None:
    """Dense before first_k_dense_replace and off the moe_layer_freq beat; MoE layers hold the
    stacked experts, the float32 router and the shared experts (n_shared_experts wide)."""
    from engine.models.deepseek_v2 import DeepseekV2ForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # as load_model builds a bf16 model: the router stays float32
    try:
        model = DeepseekV2ForCausalLM(tiny_config("deepseek_v2_moe", num_hidden_layers=4, moe_layer_freq=2))
    finally:
        torch.set_default_dtype(previous)
    mlps = [layer.mlp for layer in model.model.layers]
    assert [isinstance(m, SparseMoeBlock) for m in mlps] == [False, False, True, False]
    moe: Any = mlps[2]
    assert moe.experts.gate_up.weight.shape == (8, 2 * 32, 64) and moe.experts.down.weight.shape == (8, 64, 32)
    assert moe.gate.weight.dtype == torch.float32 and moe.shared_expert_gate is None
    assert moe.shared_expert.gate_up_proj.weight.shape == (2 * 2 * 32, 64)
    assert moe.experts.routing == Routing(3, False, 1.5, num_groups=4, topk_groups=2)


def test_bf16_moe_model_keeps_a_float32_router(tmp_path: Path) -> None:
    """bf16 on the CPU (packed experts where oneDNN has them): the routers keep the checkpoint's
    float32 weights and the logits stay within bf16 rounding of the float32 model's."""
    save_tiny_model(str(tmp_path), tiny_config("deepseek_v2_moe"))
    model: Any = load_model(str(tmp_path), torch.bfloat16, "cpu")
    reference: Any = load_model(str(tmp_path), torch.float32, "cpu")
    router = model.model.layers[1].mlp.gate.weight
    assert router.dtype == torch.float32 and torch.equal(router, reference.model.layers[1].mlp.gate.weight)
    prompt = _prompt(16, seed=3)
    assert rel_err(Harness(model).prefill(0, prompt), Harness(reference).prefill(0, prompt)) < 3e-2


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"topk_method": "noaux_tc"}, "topk_method='noaux_tc'"),
        ({"scoring_func": "sigmoid"}, "scoring_func='sigmoid'"),
        ({"n_group": 3}, "n_group=3 does not divide the 8 experts"),
        ({"topk_group": 1, "num_experts_per_tok": 3}, "top_k=3 exceeds the 1 groups' 2 experts"),
    ],
)
def test_unsupported_routing_is_refused_at_load(tmp_path: Path, overrides: dict[str, Any], message: str) -> None:
    save_tiny_model(str(tmp_path), tiny_config("deepseek_v2_moe"))
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **overrides}))
    with pytest.raises(ValueError, match=re.escape(message)):
        load_model(str(tmp_path), torch.float32, "cpu")


def test_random_lite_shaped_model_script_writes_a_loadable_model(tmp_path: Path) -> None:
    """scripts/make_random_deepseek_v2.py at reduced sizes: with --dense the engine loads and runs
    it; by default (V2-Lite's mixture of experts) its tensors are the released checkpoints' (one
    per expert) and the engine loads and runs it too."""
    import importlib.util

    path = Path(__file__).resolve().parents[3] / "scripts" / "make_random_deepseek_v2.py"
    spec = importlib.util.spec_from_file_location("make_random_deepseek_v2", path)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    small = ["vocab_size=256", "hidden_size=64", "intermediate_size=96", "moe_intermediate_size=32",
             "num_hidden_layers=3", "num_attention_heads=4", "num_key_value_heads=4", "n_routed_experts=4",
             "num_experts_per_tok=2", "kv_lora_rank=32", "qk_rope_head_dim=16", "qk_nope_head_dim=16",
             "v_head_dim=16", "max_position_embeddings=512"]
    args = [arg for item in small for arg in ("--set", item)]
    script.main(["--out", str(tmp_path / "dense"), "--dense", *args])
    model: Any = load_model(str(tmp_path / "dense"), torch.float32, "cpu")
    assert model.model.layers[0].self_attn.attn.scale != (16 + 16) ** -0.5  # YaRN's mscale
    tokens = Harness(model).generate([5, 6, 7], 4)
    assert len(tokens) == 4
    script.main(["--out", str(tmp_path / "moe"), *args])
    from safetensors import safe_open

    with safe_open(str(tmp_path / "moe" / "model-00001.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.mlp.gate_proj.weight" in names and "model.layers.1.mlp.experts.3.down_proj.weight" in names
    moe: Any = load_model(str(tmp_path / "moe"), torch.float32, "cpu")
    assert isinstance(moe.model.layers[1].mlp, SparseMoeBlock)
    assert len(Harness(moe).generate([5, 6, 7], 4)) == 4
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    every = sum(2 * p.numel() for p in moe.parameters()) - 2 * 256 * 64  # but the embedding table's rows
    unpicked = 2 * 2 * 2 * (3 * 64 * 32)  # bf16 bytes of layers 1, 2's 2 unpicked experts (3 of 64 x 32)
    assert script.active_bytes(config) == every - unpicked + 2 * 64
