"""GLM: the native `GlmForCausalLM` (GLM-4 in transformers' layout), `Glm4ForCausalLM` (GLM-4-0414,
which adds a norm after the attention and after the MLP of each layer) and the remote-code
ChatGLM2 / ChatGLM3 / GLM-4 checkpoints (`ChatGLMModel`, `ChatGLMForConditionalGeneration`).

Both are Llama-shaped decoders (RMSNorm, SwiGLU, grouped-query attention with q/k/v biases and
none on the output projection) whose rotary embedding turns only the first half of each head,
in interleaved pairs (x0, x1), (x2, x3), ... At load, `interleaved_to_half_rows` reorders the
rows of q and k (weights and biases) so that the engine's `rotate_half` rotation over
`rotary_dim = head_dim / 2` computes the same attention; nothing else differs from
`LlamaForCausalLM`.

ChatGLM's checkpoints name the same tensors their own way and fuse them:
`transformer.embedding.word_embeddings`, `transformer.encoder.layers.N.self_attention.
query_key_value` (q | k | v rows, `multi_query_group_num` kv heads, with bias),
`self_attention.dense`, `mlp.dense_h_to_4h` (gate | up), `mlp.dense_4h_to_h`,
`transformer.encoder.final_layernorm`, `transformer.output_layer`. Its config.json is read by
`engine.models.remote_config` (no remote code runs), which gives these sizes their standard names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any, cast

import torch

from engine.distributed.lazy_weight import WeightLike, read_weight
from engine.layers import RMSNorm, interleaved_to_half_rows
from engine.model_config import ModelConfig
from engine.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM


class GlmForCausalLM(LlamaForCausalLM):
    """GLM-4 in transformers' layout: q/k/v biases (`attention_bias`), none on o_proj, fused
    gate_up_proj, rotary over half of each head in interleaved pairs (permuted at load)."""

    @classmethod
    def o_bias(cls, config: Any) -> bool:
        return False

    def _attention(self) -> LlamaAttention:
        return cast(LlamaAttention, self.model.layers[0].self_attn)  # every layer's sizes are the same

    def _to_half_rows(self, name: str, tensor: WeightLike) -> WeightLike:
        """q_proj / k_proj rows (weight or bias) from the interleaved rotary layout to rotate_half."""
        attn = self._attention()
        qkv = attn.qkv_proj
        if ".q_proj." in name:
            heads = qkv.total_num_heads
        elif ".k_proj." in name:
            heads = qkv.total_num_kv_heads
        else:
            return tensor
        return interleaved_to_half_rows(read_weight(tensor), heads, attn.rotary_emb.rotary_dim)

    def checkpoint_weights(self, weights: Iterable[tuple[str, WeightLike]]) -> Iterable[tuple[str, WeightLike]]:
        for name, tensor in weights:
            yield name, self._to_half_rows(name, tensor)


_GLM4_NORMS = ("post_self_attn_layernorm", "post_mlp_layernorm")


class Glm4ForCausalLM(GlmForCausalLM):
    """GLM with "sandwich" norms: each layer also normalizes its attention output
    (`post_self_attn_layernorm`) and its MLP output (`post_mlp_layernorm`) before they join the
    residual stream."""

    def __init__(self, config: Any, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__(config, tp_rank, tp_size)
        shape = ModelConfig.from_hf_config(config)
        for layer in self.model.layers:  # replicated weights [hidden], named as in the checkpoints
            for name in _GLM4_NORMS:
                layer.add_module(name, RMSNorm(shape.hidden_size, shape.norm_eps))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # LlamaModel.forward with the two extra norms; the residual add stays fused into the others.
        model = self.model
        hidden = model.embed_tokens(input_ids)  # [T, hidden_size]
        residual: torch.Tensor | None = None
        for module in model.layers:
            layer = cast(LlamaDecoderLayer, module)
            if residual is None:
                residual, hidden = hidden, layer.input_layernorm(hidden)
            else:
                hidden, residual = layer.input_layernorm(hidden, residual)
            post_attn_norm, post_mlp_norm = (cast(RMSNorm, layer.get_submodule(n)) for n in _GLM4_NORMS)
            hidden = post_attn_norm(layer.self_attn(positions, hidden))
            hidden, residual = layer.post_attention_layernorm(hidden, residual)
            hidden = post_mlp_norm(layer.mlp(hidden))
        hidden, _ = model.norm(hidden, residual)
        return hidden


_CHATGLM_LAYER = re.compile(r"transformer\.encoder\.layers\.(\d+)\.(.+)$")
_CHATGLM_LAYER_NAMES = {
    "self_attention.dense": "self_attn.o_proj",
    "mlp.dense_h_to_4h": "mlp.gate_up_proj",  # gate | up, as the fused parameter lays them out
    "mlp.dense_4h_to_h": "mlp.down_proj",
    "input_layernorm": "input_layernorm",
    "post_attention_layernorm": "post_attention_layernorm",
}
_CHATGLM_GLOBAL_NAMES = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}


class ChatGLMForCausalLM(GlmForCausalLM):
    """ChatGLM2 / ChatGLM3 / GLM-4 checkpoints (remote-code names, fused query_key_value)."""

    def _split_qkv(self, prefix: str, kind: str, tensor: WeightLike) -> Iterator[tuple[str, WeightLike]]:
        # query_key_value rows: [q (H * D) | k (KV * D) | v (KV * D)]
        qkv = self._attention().qkv_proj
        q_rows = qkv.total_num_heads * qkv.head_size
        kv_rows = qkv.total_num_kv_heads * qkv.head_size
        for proj, start, rows in (("q_proj", 0, q_rows), ("k_proj", q_rows, kv_rows), ("v_proj", q_rows + kv_rows, kv_rows)):
            name = f"{prefix}.self_attn.{proj}.{kind}"
            yield name, self._to_half_rows(name, tensor.narrow(0, start, rows))

    def checkpoint_weights(self, weights: Iterable[tuple[str, WeightLike]]) -> Iterable[tuple[str, WeightLike]]:
        for name, tensor in weights:
            if name in _CHATGLM_GLOBAL_NAMES:
                yield _CHATGLM_GLOBAL_NAMES[name], tensor
                continue
            match = _CHATGLM_LAYER.match(name)
            if match is None:
                if not name.endswith("rotary_pos_emb.inv_freq"):  # recomputed from the config
                    yield name, tensor  # the loader names what it does not know
                continue
            layer, rest = match.groups()
            prefix = f"model.layers.{layer}"
            module, _, kind = rest.rpartition(".")
            if module == "self_attention.query_key_value":
                yield from self._split_qkv(prefix, kind, tensor)
            elif module in _CHATGLM_LAYER_NAMES:
                yield f"{prefix}.{_CHATGLM_LAYER_NAMES[module]}.{kind}", tensor
            else:
                yield name, tensor
