"""Cohere and Cohere2 against the transformers implementation (fp32, CPU, random weights)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from engine.layers import interleaved_to_half_rows
from engine.models import load_model
from engine.models.cohere import half_rows
from tests.engine.models.family_checks import *  # noqa: F403
from tests.engine.models.harness import save_tiny_model, tiny_config

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "cohere": ("cohere", {}),  # tied head, logit scale, interleaved rotary, GQA
    "cohere-qk-norm-bias": ("cohere", {"use_qk_norm": True, "attention_bias": True}),
    "cohere2-sliding-pattern": ("cohere2", {}),  # window 6; layer 0 sliding + rotary, layer 1 global
    "cohere2-layer-types": (
        "cohere2",
        {"num_hidden_layers": 3, "layer_types": ["full_attention", "sliding_attention", "sliding_attention"]},
    ),
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


def test_cohere2_layers_alternate_window_and_rotary(tmp_path: Path) -> None:
    save_tiny_model(str(tmp_path), tiny_config("cohere2", num_hidden_layers=4))  # pattern 2
    model: Any = load_model(str(tmp_path), torch.float32, "cpu")
    attns = [layer.self_attn for layer in model.model.layers]
    assert [a.attn.sliding_window for a in attns] == [6, None, 6, None]
    assert [a.rotary_emb is not None for a in attns] == [True, False, True, False]
    assert model.logit_scale == 0.5 and model.lm_head.weight is model.model.embed_tokens.weight
    assert all(layer.post_attention_layernorm is None and layer.input_layernorm.bias is None
               for layer in model.model.layers)


def test_cohere_per_head_norms_are_split_by_head_across_ranks(tmp_path: Path) -> None:
    """Each tensor-parallel rank holds its own heads' q/k rows and q/k norm rows, reordered."""
    hf = save_tiny_model(str(tmp_path), tiny_config("cohere", use_qk_norm=True, num_key_value_heads=1))
    state = hf.state_dict()
    whole: Any = load_model(str(tmp_path), torch.float32, "cpu")
    for rank in (0, 1):
        part: Any = load_model(str(tmp_path), torch.float32, "cpu", tp_rank=rank, tp_size=2)
        ours, full = part.model.layers[0].self_attn, whole.model.layers[0].self_attn
        torch.testing.assert_close(ours.q_norm.weight, full.q_norm.weight[2 * rank : 2 * rank + 2])
        torch.testing.assert_close(ours.k_norm.weight, full.k_norm.weight)  # 1 kv head: replicated
        q_rows = interleaved_to_half_rows(state["model.layers.0.self_attn.q_proj.weight"], 4)
        torch.testing.assert_close(ours.qkv_proj.weight[:32], q_rows[32 * rank : 32 * rank + 32])


def test_lazy_half_rows_reads_only_whole_heads() -> None:
    weight = torch.randn(4 * 8, 5)
    lazy = half_rows(weight, 8)
    torch.testing.assert_close(lazy.narrow(0, 16, 16).narrow(1, 1, 3).read(),
                               interleaved_to_half_rows(weight, 4)[16:32, 1:4])
    with pytest.raises(ValueError, match="whole heads"):
        lazy.narrow(0, 4, 8).read()


def test_cohere2_config_without_layer_types_follows_its_sliding_window_pattern() -> None:
    """Configs written before `layer_types` existed give the period of the global layers."""
    from engine.models.cohere import Cohere2ForCausalLM

    config = SimpleNamespace(num_hidden_layers=8, sliding_window=4096, sliding_window_pattern=4)
    windows = [Cohere2ForCausalLM.sliding_window_of(config, i) for i in range(8)]
    assert windows == [4096, 4096, 4096, None] * 2
    assert [Cohere2ForCausalLM.rotates(config, i) for i in range(8)] == [True, True, True, False] * 2


def test_a_non_silu_mlp_is_refused_at_load(tmp_path: Path) -> None:
    save_tiny_model(str(tmp_path), tiny_config("cohere", hidden_act="gelu"))
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        load_model(str(tmp_path), torch.float32, "cpu")
