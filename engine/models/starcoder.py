"""StarCoder families: GPTBigCode (starcoder, starcoderbase, santacoder) and StarCoder2.

Both are pre-norm decoders with LayerNorm (weight and bias) and a plain GELU MLP
(`c_fc` -> activation -> `c_proj`), wired over `engine/layers`; as in `llama.py`, a step's
tokens are packed (input_ids [T], positions [T]) and the residual add is fused into the norms.

GPTBigCode: multi-query attention (`multi_query`: one kv head shared by every query head;
False: multi-head), learned absolute positions (`wpe`, read at each token's position), a fused
`c_attn` projection, biases everywhere, the LM head tied to `wte`. Checkpoints name it
`transformer.h.N.attn.c_attn.weight`, ... Multi-query `c_attn` rows are q (H * D) | k (D) | v (D)
as `QKVParallelLinear` lays them out, so tensor parallelism shards q by heads and replicates the
kv head; multi-head checkpoints keep each head's q, k and v together ([H, 3, D] rows), which
`checkpoint_weights` re-lays as q | k | v.

StarCoder2: Llama's attention (grouped-query, rotary, biases when `use_bias`, a sliding window
over every layer when `sliding_window` is set) with the GPT-style norms and MLP; checkpoint
names `model.layers.N.self_attn.q_proj.weight`, `model.layers.N.mlp.c_fc.weight`, ...
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from engine.distributed.lazy_weight import WeightLike, read_weight
from engine.layers import (
    Activation,
    Attention,
    ColumnParallelLinear,
    LayerNorm,
    ParallelLMHead,
    QKVParallelLinear,
    RotaryEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
    get_rope,
)
from engine.model_config import ModelConfig
from engine.models.causal_lm import CausalLM
from engine.models.llama import LlamaAttention, PreNormDecoderLayer


class GeluMLP(nn.Module):
    """c_proj(act(c_fc(x))): the non-gated MLP of both families (biases optional)."""

    def __init__(self, shape: ModelConfig, bias: bool, act: str, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        inter = shape.intermediate_size
        self.c_fc = ColumnParallelLinear(shape.hidden_size, inter, bias, tp_rank, tp_size)
        self.act = Activation(act)
        self.c_proj = RowParallelLinear(inter, shape.hidden_size, bias, tp_rank, tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


def _lm_head(shape: ModelConfig, embedding: VocabParallelEmbedding, tp_rank: int, tp_size: int) -> ParallelLMHead:
    """The LM head, sharing `embedding`'s weight when the config ties them (both families' default)."""
    head = ParallelLMHead(shape.vocab_size, shape.hidden_size, tp_rank=tp_rank, tp_size=tp_size)
    if shape.tie_word_embeddings:
        head.tie_weights(embedding)
    return head


# ---- GPTBigCode ---------------------------------------------------------------------------


class GPTBigCodeAttention(nn.Module):
    def __init__(self, config: Any, shape: ModelConfig, layer_idx: int, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        hidden, head_dim = shape.hidden_size, shape.head_dim
        self.c_attn = QKVParallelLinear(
            hidden, head_dim, shape.num_heads, shape.num_kv_heads, True, tp_rank, tp_size
        )
        self.c_proj = RowParallelLinear(shape.num_heads * head_dim, hidden, True, tp_rank, tp_size)
        self.q_size, self.kv_size = self.c_attn.q_size, self.c_attn.kv_size
        # transformers scales the scores by 1 / sqrt(head_dim), or not at all without scale_attn_weights
        scale = head_dim**-0.5 if getattr(config, "scale_attn_weights", True) else 1.0
        self.attn = Attention(
            self.c_attn.num_heads, self.c_attn.num_kv_heads, head_dim, scale=scale, layer_idx=layer_idx
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        qkv = self.c_attn(hidden)  # [T, (H + 2 KV) * D] on this rank
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return self.c_proj(self.attn(q, k, v))


class GPTBigCodeBlock(nn.Module):
    def __init__(self, config: Any, shape: ModelConfig, layer_idx: int, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(shape.hidden_size, shape.norm_eps)
        self.attn = GPTBigCodeAttention(config, shape, layer_idx, tp_rank, tp_size)
        self.ln_2 = LayerNorm(shape.hidden_size, shape.norm_eps)
        act = getattr(config, "activation_function", "gelu_pytorch_tanh")
        self.mlp = GeluMLP(shape, True, act, tp_rank, tp_size)

    def forward(
        self, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # hidden / residual: [T, hidden_size]; the residual add is fused into the norms.
        if residual is None:
            residual = hidden
            hidden = self.ln_1(hidden)
        else:
            hidden, residual = self.ln_1(hidden, residual)
        hidden, residual = self.ln_2(self.attn(hidden), residual)
        return self.mlp(hidden), residual


class GPTBigCodeModel(nn.Module):
    def __init__(self, config: Any, shape: ModelConfig, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        self.wte = VocabParallelEmbedding(shape.vocab_size, shape.hidden_size, tp_rank, tp_size)
        # The position table is small next to the vocabulary: every rank holds all of it (as a
        # one-rank embedding), so a lookup needs no collective.
        self.wpe = VocabParallelEmbedding(shape.max_position_embeddings, shape.hidden_size)
        self.h = nn.ModuleList(
            GPTBigCodeBlock(config, shape, i, tp_rank, tp_size) for i in range(shape.num_layers)
        )
        self.ln_f = LayerNorm(shape.hidden_size, shape.norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.wte(input_ids) + self.wpe(positions)  # [T, hidden_size]
        residual: torch.Tensor | None = None
        for block in self.h:
            hidden, residual = block(hidden, residual)
        hidden, _ = self.ln_f(hidden, residual)
        return hidden


class GPTBigCodeForCausalLM(CausalLM):
    packed_modules_mapping: dict[str, tuple[str, str | int]] = {}  # c_attn is fused already

    def __init__(self, config: Any, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        self.config = config
        shape = ModelConfig.from_hf_config(config)
        self.multi_query = bool(getattr(config, "multi_query", True))  # shape.num_kv_heads follows it
        self.transformer = GPTBigCodeModel(config, shape, tp_rank, tp_size)
        self.lm_head = _lm_head(shape, self.transformer.wte, tp_rank, tp_size)
        self.tie_word_embeddings = shape.tie_word_embeddings
        self.num_heads, self.head_dim = shape.num_heads, shape.head_dim

    def checkpoint_weights(self, weights: Iterable[tuple[str, WeightLike]]) -> Iterable[tuple[str, WeightLike]]:
        if self.multi_query:
            return weights  # q | k | v already
        return self._multi_head_to_blocks(weights)

    def _multi_head_to_blocks(
        self, weights: Iterable[tuple[str, WeightLike]]
    ) -> Iterator[tuple[str, WeightLike]]:
        """Multi-head `c_attn` rows [H, (q, k, v), D] -> q | k | v (read whole: every rank
        needs rows from all three parts)."""
        for name, tensor in weights:
            if ".attn.c_attn." in name:
                value = read_weight(tensor)
                rest = value.shape[1:]
                value = value.reshape(self.num_heads, 3, self.head_dim, *rest).transpose(0, 1)
                tensor = value.reshape(3 * self.num_heads * self.head_dim, *rest).contiguous()
            yield name, tensor

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # input_ids, positions: [T] int64 -> hidden [T, hidden_size] after the final norm
        return self.transformer(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()


# ---- StarCoder2 ---------------------------------------------------------------------------


class Starcoder2DecoderLayer(PreNormDecoderLayer):
    def __init__(
        self, config: Any, shape: ModelConfig, layer_idx: int, rotary_emb: RotaryEmbedding, tp_rank: int, tp_size: int
    ) -> None:
        super().__init__()
        bias = bool(getattr(config, "use_bias", True))
        self.self_attn = LlamaAttention(
            shape,
            layer_idx,
            rotary_emb,
            qkv_bias=bias,
            o_bias=bias,
            sliding_window=getattr(config, "sliding_window", None),
            qk_norm=False,
            tp_rank=tp_rank,
            tp_size=tp_size,
        )
        self.mlp = GeluMLP(shape, bias, getattr(config, "hidden_act", "gelu_pytorch_tanh"), tp_rank, tp_size)
        self.input_layernorm = LayerNorm(shape.hidden_size, shape.norm_eps)
        self.post_attention_layernorm = LayerNorm(shape.hidden_size, shape.norm_eps)


class Starcoder2Model(nn.Module):
    def __init__(self, config: Any, shape: ModelConfig, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(shape.vocab_size, shape.hidden_size, tp_rank, tp_size)
        rotary_emb = get_rope(config, shape.head_dim)  # shared by every layer
        self.layers = nn.ModuleList(
            Starcoder2DecoderLayer(config, shape, i, rotary_emb, tp_rank, tp_size) for i in range(shape.num_layers)
        )
        self.norm = LayerNorm(shape.hidden_size, shape.norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # [T, hidden_size]
        residual: torch.Tensor | None = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class Starcoder2ForCausalLM(CausalLM):
    packed_modules_mapping: dict[str, tuple[str, str | int]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
    }

    def __init__(self, config: Any, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        self.config = config
        shape = ModelConfig.from_hf_config(config)
        self.model = Starcoder2Model(config, shape, tp_rank, tp_size)
        self.lm_head = _lm_head(shape, self.model.embed_tokens, tp_rank, tp_size)
        self.tie_word_embeddings = shape.tie_word_embeddings

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
