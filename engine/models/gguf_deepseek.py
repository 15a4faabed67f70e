"""llama.cpp's `deepseek2` GGUF files -> a DeepSeek-V2 (`deepseek_v2`) config and tensors.

The metadata gives the latent attention's sizes: `attention.kv_lora_rank`,
`attention.q_lora_rank` (absent: a plain q projection), `rope.dimension_count` (the rotary
part of each head), and the per-head key / value lengths, in `attention.key_length_mla` /
`value_length_mla` (files that also describe the latent as one head of `key_length` =
kv_lora_rank + rope) or, in older files, in `attention.key_length` / `value_length` themselves.
YaRN: `rope.scaling.type` yarn with `factor`, `original_context_length` and
`yarn_log_multiplier` = 0.1 * mscale_all_dim (mscale is taken equal to it, as in every
DeepSeek-V2 config, so the rotary part keeps an attention factor of 1).

Tensors: llama.cpp's converter keeps the q / k_pe rows in the checkpoint's interleaved rotary
layout (engine/models/deepseek_v2.py reorders them at load, as for a Hugging Face checkpoint).
Newer files split kv_b_proj per head into `attn_k_b` ([H, kv_lora_rank, qk_nope], the key half
transposed) and `attn_v_b` ([H, v_head_dim, kv_lora_rank]); `merge_kv_b` joins them back into
kv_b_proj's [H * (qk_nope + v_head_dim), kv_lora_rank] rows.

Experts: the layers from `leading_dense_block_count` on are mixtures of `expert_count` experts,
`expert_used_count` per token, `expert_shared_count` shared experts, each
`expert_feed_forward_length` wide; routed weights times `expert_weights_scale`;
`expert_group_count` / `expert_group_used_count` (above 1: DeepSeek-V2's grouped top-k, else
greedy); `expert_weights_norm` -> norm_topk_prob. Tensors: the router `ffn_gate_inp`, the
stacked experts `ffn_{gate,up,down}_exps` (one tensor per expert once converted, by
engine/models/gguf_moe.py) and the shared experts `ffn_{gate,up,down}_shexp`. Files routed as
DeepSeek-V3 (sigmoid `expert_gating_func`, a score-correction bias `exp_probs_b`) are refused:
lightgate routes DeepSeek-V2's softmax scores only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from engine.models.gguf_metadata import metadata_value
from engine.models.gguf_tensors import Planned, TensorRef

# llama.cpp block tensor -> DeepSeek-V2's module under model.layers.N
DEEPSEEK2_BLOCK_NAMES = {
    "attn_q_a": "self_attn.q_a_proj",
    "attn_q_a_norm": "self_attn.q_a_layernorm",
    "attn_q_b": "self_attn.q_b_proj",
    "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
    "attn_kv_a_norm": "self_attn.kv_a_layernorm",
    "attn_kv_b": "self_attn.kv_b_proj",
    "attn_k_b": "self_attn.k_b_proj",  # halves of kv_b_proj, joined by `merge_kv_b`
    "attn_v_b": "self_attn.v_b_proj",
    "ffn_gate_shexp": "mlp.shared_experts.gate_proj",
    "ffn_up_shexp": "mlp.shared_experts.up_proj",
    "ffn_down_shexp": "mlp.shared_experts.down_proj",
}
_SIGMOID_GATING = 2  # llama.cpp's expert_gating_func: 1 softmax, 2 sigmoid
_HALF_RE = re.compile(r"(model\.layers\.\d+\.self_attn)\.([kv])_b_proj\.weight$")


def deepseek2_config(reader: Any) -> dict[str, Any]:
    """config.json content (transformers' `deepseek_v2` fields) from the GGUF metadata."""

    def value(key: str, default: Any = None) -> Any:
        found = metadata_value(reader, f"deepseek2.{key}", default)
        if found is None:
            raise ValueError(f"the GGUF file has no deepseek2.{key}")
        return found

    layers = int(value("block_count"))
    rope_dim = int(value("rope.dimension_count"))
    key_length = int(metadata_value(reader, "deepseek2.attention.key_length_mla") or value("attention.key_length"))
    value_length = int(metadata_value(reader, "deepseek2.attention.value_length_mla") or value("attention.value_length"))
    names = {t.name for t in reader.tensors}
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    config: dict[str, Any] = {
        "model_type": "deepseek_v2",
        "architectures": ["DeepseekV2ForCausalLM"],
        "hidden_size": int(value("embedding_length")),
        "num_hidden_layers": layers,
        "num_attention_heads": int(value("attention.head_count")),
        "intermediate_size": int(value("feed_forward_length")),
        "max_position_embeddings": int(value("context_length")),
        "rms_norm_eps": float(value("attention.layer_norm_rms_epsilon")),
        "vocab_size": int(embedding.shape[1]),
        "tie_word_embeddings": "output.weight" not in names,
        "kv_lora_rank": int(value("attention.kv_lora_rank")),
        "q_lora_rank": metadata_value(reader, "deepseek2.attention.q_lora_rank"),
        "qk_rope_head_dim": rope_dim,
        "qk_nope_head_dim": key_length - rope_dim,
        "v_head_dim": value_length,
        "first_k_dense_replace": layers,  # every layer dense unless `_expert_fields` says otherwise
        "attention_bias": "blk.0.attn_kv_a_mqa.bias" in names,
        "rope_parameters": _rope_parameters(reader, float(value("rope.freq_base", 10000.0))),
        "bos_token_id": metadata_value(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata_value(reader, "tokenizer.ggml.eos_token_id"),
    }
    config.update(_expert_fields(reader, layers, names))
    return config


def _expert_fields(reader: Any, layers: int, tensor_names: set[str]) -> dict[str, Any]:
    """The mixture-of-experts fields of config.json ({} for a file without experts)."""

    def meta(key: str, default: Any = None) -> Any:
        return metadata_value(reader, f"deepseek2.{key}", default)

    num_experts = int(meta("expert_count", 0) or 0)
    dense = int(meta("leading_dense_block_count", layers))
    if not num_experts or dense >= layers:
        return {}
    if meta("expert_gating_func") == _SIGMOID_GATING or any(n.endswith(".exp_probs_b.bias") for n in tensor_names):
        raise ValueError(
            "this deepseek2 GGUF routes its experts as DeepSeek-V3 does (sigmoid scores, exp_probs_b): "
            "lightgate serves DeepSeek-V2's softmax routing only"
        )
    groups, used_groups = int(meta("expert_group_count", 1) or 1), int(meta("expert_group_used_count", 1) or 1)
    fields: dict[str, Any] = {
        "first_k_dense_replace": dense,
        "n_routed_experts": num_experts,
        "num_experts_per_tok": int(meta("expert_used_count", 0) or 0),
        "n_shared_experts": int(meta("expert_shared_count", 0) or 0),
        "moe_intermediate_size": int(meta("expert_feed_forward_length") or 0),
        "routed_scaling_factor": float(meta("expert_weights_scale", 1.0) or 1.0),
        "norm_topk_prob": bool(meta("expert_weights_norm", False)),
        "moe_layer_freq": 1,
        "scoring_func": "softmax",
        "topk_method": "greedy",
    }
    if not fields["moe_intermediate_size"]:
        raise ValueError("the GGUF file has no deepseek2.expert_feed_forward_length")
    if groups > 1:
        fields.update(topk_method="group_limited_greedy", n_group=groups, topk_group=used_groups)
    return fields


def _rope_parameters(reader: Any, theta: float) -> dict[str, Any]:
    if metadata_value(reader, "deepseek2.rope.scaling.type") != "yarn":
        return {"rope_type": "default", "rope_theta": theta}
    mscale = float(metadata_value(reader, "deepseek2.rope.scaling.yarn_log_multiplier", 0.0)) / 0.1
    return {
        "rope_type": "yarn",
        "rope_theta": theta,
        "factor": float(metadata_value(reader, "deepseek2.rope.scaling.factor")),
        "original_max_position_embeddings": int(metadata_value(reader, "deepseek2.rope.scaling.original_context_length")),
        "beta_fast": float(metadata_value(reader, "deepseek2.rope.scaling.yarn_beta_fast", 32.0)),
        "beta_slow": float(metadata_value(reader, "deepseek2.rope.scaling.yarn_beta_slow", 1.0)),
        "mscale": mscale,
        "mscale_all_dim": mscale,
    }


def join_kv_b(k_b: torch.Tensor, v_b: torch.Tensor) -> torch.Tensor:
    """k_b_proj [H, r, dn] and v_b_proj [H, dv, r] -> kv_b_proj [H * (dn + dv), r]."""
    return torch.cat((k_b.transpose(1, 2), v_b), dim=1).reshape(-1, k_b.shape[1]).contiguous()


def merge_kv_b(tensors: Iterable[tuple[str, Planned]]) -> Iterator[tuple[str, Planned]]:
    """Pass the tensors through, joining each layer's k_b_proj [H, r, dn] and v_b_proj
    [H, dv, r] into kv_b_proj [H * (dn + dv), r] once both are read (references into one
    reference joined at load, `join` "kv_b")."""
    halves: dict[str, dict[str, Planned]] = {}
    for name, tensor in tensors:
        match = _HALF_RE.match(name)
        if match is None:
            yield name, tensor
            continue
        prefix, half = match.groups()
        parts = halves.setdefault(prefix, {})
        parts[half] = tensor
        if len(parts) == 2:
            k_b, v_b = parts["k"], parts["v"]
            if isinstance(k_b, TensorRef) and isinstance(v_b, TensorRef):
                yield f"{prefix}.kv_b_proj.weight", TensorRef((k_b.parts[0], v_b.parts[0]), join="kv_b")
            else:
                assert isinstance(k_b, torch.Tensor) and isinstance(v_b, torch.Tensor)
                yield f"{prefix}.kv_b_proj.weight", join_kv_b(k_b, v_b)
            del halves[prefix]
    if halves:
        raise ValueError(f"GGUF deepseek2 file with half of kv_b_proj only: {sorted(halves)}")
