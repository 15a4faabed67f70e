"""InternLM2 / InternLM2.5 (`InternLM2ForCausalLM`, remote code) and InternLM3 (`InternLM3ForCausalLM`).

Both are Llama: RMSNorm, SwiGLU, grouped-query attention, `rotate_half` rotary. InternLM3's
checkpoints use Llama's names (transformers reads its config natively and builds a Llama).
InternLM2's use their own, mapped at load:

    model.tok_embeddings              -> model.embed_tokens
    model.layers.N.attention.wqkv     -> self_attn.q_proj | k_proj | v_proj (regrouped, below)
    model.layers.N.attention.wo       -> self_attn.o_proj
    model.layers.N.feed_forward.w1/w3/w2 -> mlp.gate_proj / up_proj / down_proj
    model.layers.N.attention_norm / ffn_norm -> input_layernorm / post_attention_layernorm
    output                            -> lm_head

`wqkv` is grouped by kv head: rows [KV groups x (G query heads, 1 key head, 1 value head) x D]
with G = heads / KV. The loader regroups it into the separate q, k and v tensors (query head
h * G + g is row block g of group h), which then load through `packed_modules_mapping` like
Llama's, each tensor-parallel rank taking its own heads. `config.bias` (read as
`attention_bias` by `engine.models.remote_config`) puts biases on wqkv and wo, in the same layout.

A `dynamic` rotary scaling (both families) is the default rotation within
`max_position_embeddings`, the engine's default context (see `engine.models.remote_config`).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Iterator
from typing import Any, cast

from engine.distributed.lazy_weight import WeightLike, read_weight
from engine.layers import rope_parameters_from_config
from engine.models.llama import LlamaAttention, LlamaForCausalLM

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)$")
_LAYER_NAMES = {
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "model.tok_embeddings.weight": "model.embed_tokens.weight",
    "model.norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


class InternLM2ForCausalLM(LlamaForCausalLM):
    """InternLM2 / 2.5: Llama under its own checkpoint names, with q | k | v fused per kv group."""

    def _split_wqkv(self, prefix: str, kind: str, tensor: WeightLike) -> Iterator[tuple[str, WeightLike]]:
        qkv = cast(LlamaAttention, self.model.layers[0].self_attn).qkv_proj  # the same sizes in every layer
        num_kv, head_dim = qkv.total_num_kv_heads, qkv.head_size
        group = qkv.total_num_heads // num_kv
        if tensor.shape[0] != num_kv * (group + 2) * head_dim:
            raise ValueError(
                f"weight shape mismatch: {prefix}.attention.wqkv.{kind} needs {num_kv * (group + 2) * head_dim} "
                f"rows (kv heads x (query heads per kv head + 2) x head size), checkpoint {tuple(tensor.shape)}"
            )
        grouped = read_weight(tensor).unflatten(0, (num_kv, group + 2, head_dim))  # [KV, G + 2, D, ...]
        yield f"{prefix}.self_attn.q_proj.{kind}", grouped[:, :group].flatten(0, 2).contiguous()
        yield f"{prefix}.self_attn.k_proj.{kind}", grouped[:, group].flatten(0, 1).contiguous()
        yield f"{prefix}.self_attn.v_proj.{kind}", grouped[:, group + 1].flatten(0, 1).contiguous()

    def checkpoint_weights(self, weights: Iterable[tuple[str, WeightLike]]) -> Iterable[tuple[str, WeightLike]]:
        for name, tensor in weights:
            if name in _GLOBAL_NAMES:
                yield _GLOBAL_NAMES[name], tensor
                continue
            match = _LAYER.match(name)
            if match is None:
                yield name, tensor  # the loader names what it does not know
                continue
            layer, rest = match.groups()
            module, _, kind = rest.rpartition(".")
            prefix = f"model.layers.{layer}"
            if module == "attention.wqkv":
                yield from self._split_wqkv(prefix, kind, tensor)
            elif module in _LAYER_NAMES:
                yield f"{prefix}.{_LAYER_NAMES[module]}.{kind}", tensor
            else:
                yield name, tensor


class InternLM3ForCausalLM(LlamaForCausalLM):
    """InternLM3: Llama's layers and names (`qkv_bias` on q/k/v, `bias` on o_proj and the MLP,
    which transformers' config maps to `attention_bias` / `mlp_bias` and requires equal)."""

    def __init__(self, config: Any, tp_rank: int = 0, tp_size: int = 1) -> None:
        params = rope_parameters_from_config(config)
        if params["rope_type"] == "dynamic":  # the default rotation within max_position_embeddings
            config = copy.copy(config)
            config.rope_parameters = {"rope_type": "default", "rope_theta": params["rope_theta"]}
        super().__init__(config, tp_rank, tp_size)
