"""llama.cpp's `deepseek2` GGUF (DeepSeek-V2, dense or with experts) -> the same model as
transformers'."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import pytest
import torch
from torch import nn

from engine.models import load_model, resolve_model
from tests.engine.models.harness import Harness, rel_err, save_tiny_model, tiny_config
from tests.engine.models.test_gguf import _add_byte_level_tokenizer

_HF_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.q_a_proj": "attn_q_a",
    "self_attn.q_a_layernorm": "attn_q_a_norm",
    "self_attn.q_b_proj": "attn_q_b",
    "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa",
    "self_attn.kv_a_layernorm": "attn_kv_a_norm",
    "self_attn.kv_b_proj": "attn_kv_b",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",
    "mlp.shared_experts.gate_proj": "ffn_gate_shexp",
    "mlp.shared_experts.up_proj": "ffn_up_shexp",
    "mlp.shared_experts.down_proj": "ffn_down_shexp",
}
_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def _tensors(hf: nn.Module, split_kv_b: bool) -> dict[str, torch.Tensor]:
    """llama.cpp's names; with `split_kv_b` (newer converters) kv_b_proj as attn_k_b, its key
    half transposed per head ([H, r, dn]), and attn_v_b ([H, dv, r]); the experts stacked per
    projection (transformers holds gate | up together)."""
    cfg: Any = hf.config
    out = {}
    for name, tensor in hf.state_dict().items():
        if name.endswith(".mlp.experts.gate_up_proj"):
            layer = name.split(".")[2]
            out[f"blk.{layer}.ffn_gate_exps.weight"], out[f"blk.{layer}.ffn_up_exps.weight"] = tensor.chunk(2, dim=1)
            continue
        if name.endswith(".mlp.experts.down_proj"):
            out[f"blk.{name.split('.')[2]}.ffn_down_exps.weight"] = tensor
            continue
        module, kind = name.rsplit(".", 1)
        if module in _GLOBAL:
            out[f"{_GLOBAL[module]}.{kind}"] = tensor
            continue
        _, _, layer, part = module.split(".", 3)
        if split_kv_b and part == "self_attn.kv_b_proj":
            per_head = tensor.view(cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, -1)
            k_b, v_b = per_head.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=1)
            out[f"blk.{layer}.attn_k_b.weight"] = k_b.transpose(1, 2)
            out[f"blk.{layer}.attn_v_b.weight"] = v_b
            continue
        out[f"blk.{layer}.{_HF_TO_GGUF[part]}.{kind}"] = tensor
    return out


def write_deepseek2_gguf(
    path: Path, hf: nn.Module, split_kv_b: bool, tokenizer: bool = False, gating_func: int | None = None
) -> None:
    """`hf`'s weights (F32) and metadata as llama.cpp's converter writes them (no permutation of
    the interleaved rotary rows; the latent described as one kv head of kv_lora_rank + rope).
    `gating_func`: the experts' expert_gating_func field, if any."""
    cfg: Any = hf.config
    writer = gguf.GGUFWriter(str(path), "deepseek2")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_leading_dense_block_count(cfg.first_k_dense_replace)
    if cfg.first_k_dense_replace < cfg.num_hidden_layers:
        _add_expert_metadata(writer, cfg, gating_func)
    if cfg.q_lora_rank is not None:
        writer.add_q_lora_rank(cfg.q_lora_rank)
    writer.add_kv_lora_rank(cfg.kv_lora_rank)
    writer.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    writer.add_value_length(cfg.kv_lora_rank)
    writer.add_key_length_mla(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    writer.add_value_length_mla(cfg.v_head_dim)
    writer.add_rope_dimension_count(cfg.qk_rope_head_dim)
    rope = cfg.rope_parameters
    if rope["rope_type"] == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        writer.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])
    if tokenizer:
        _add_byte_level_tokenizer(writer)
    for name, tensor in _tensors(hf, split_kv_b).items():
        writer.add_tensor(name, tensor.detach().float().contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_expert_metadata(writer: gguf.GGUFWriter, cfg: Any, gating_func: int | None) -> None:
    writer.add_expert_count(cfg.n_routed_experts)
    writer.add_expert_used_count(cfg.num_experts_per_tok)
    writer.add_expert_shared_count(cfg.n_shared_experts)
    writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    writer.add_expert_weights_scale(cfg.routed_scaling_factor)
    writer.add_expert_weights_norm(bool(cfg.norm_topk_prob))
    if cfg.topk_method == "group_limited_greedy":
        writer.add_expert_group_count(cfg.n_group)
        writer.add_expert_group_used_count(cfg.topk_group)
    if gating_func is not None:
        writer.add_expert_gating_func(gguf.ExpertGatingFuncType(gating_func))


_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0,
         "mscale": 0.707, "mscale_all_dim": 0.707}
CASES: dict[str, tuple[str, dict[str, Any], bool]] = {
    "q-lora-split-kv-b": ("deepseek_v2", {"vocab_size": 260}, True),  # with the file's 260-token vocabulary
    "no-q-lora-yarn-kv-b": ("deepseek_v2", {"q_lora_rank": None, "rope_parameters": _YARN}, False),
    # experts after a dense layer: grouped top-k (expert_group_count), scaled, 2 shared experts
    "moe-grouped": ("deepseek_v2_moe", {}, True),
    "moe-greedy": ("deepseek_v2_moe", {"topk_method": "greedy", "n_group": None, "topk_group": None,
                                        "num_experts_per_tok": 2, "n_shared_experts": 1}, False),
}


@torch.inference_mode()
@pytest.mark.parametrize("case", sorted(CASES))
def test_deepseek2_gguf_matches_transformers(case: str, tmp_path: Path) -> None:
    kind, overrides, split = CASES[case]
    hf = save_tiny_model(str(tmp_path / "hf"), tiny_config(kind, **overrides))
    file = tmp_path / f"tiny-{case}.gguf"
    write_deepseek2_gguf(file, hf, split, tokenizer=case.startswith("q-lora"))
    model: Any = load_model(resolve_model(str(file), str(tmp_path / "cache")), torch.float32, "cpu")
    prompt = list(range(3, 40, 3))
    assert rel_err(Harness(model).prefill(0, prompt), hf(torch.tensor([prompt])).logits[0]) < 1e-4
    if case.startswith("q-lora"):  # the tokenizer comes from the file
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(resolve_model(str(file), str(tmp_path / "cache")))
        assert tokenizer.decode(tokenizer("the cat")["input_ids"], skip_special_tokens=True) == "the cat"


def test_deepseek2_gguf_routed_as_deepseek_v3_is_refused(tmp_path: Path) -> None:
    hf = save_tiny_model(str(tmp_path / "hf"), tiny_config("deepseek_v2_moe"))
    file = tmp_path / "tiny-sigmoid.gguf"
    write_deepseek2_gguf(file, hf, split_kv_b=True, gating_func=2)  # sigmoid scores
    with pytest.raises(ValueError, match="routes its experts as DeepSeek-V3 does"):
        resolve_model(str(file), str(tmp_path / "cache"))
