"""BLOOM (`BloomForCausalLM`: bloom-560m ... bloom-7b1, bloomz): wiring over `engine/layers`.

No position table: every attention layer adds ALiBi's per-head linear bias to its scores
(`engine/layers/alibi.py`; with tensor parallelism each rank has the slopes of its own heads).
The word embeddings go through a LayerNorm before the first layer; every norm is a LayerNorm
with bias, every linear has a bias, the MLP is h -> 4h -> h with the tanh GELU, and the LM head
shares the word embeddings. Heads of 64 or 128 (bloom-560m, bloom-1b7, bloom-7b1) take the
Triton kernels on a GPU; bloom-1b1's 96 and bloom-3b's 80 take the torch attention path, as
any head size that is not a power of two does.

Checkpoint names are transformers' (`transformer.h.N.self_attention.query_key_value.weight`,
...), or the same without `transformer.` (checkpoints saved from the bare `BloomModel`). The
fused `query_key_value` lays its rows out per head, [H, 3, D] (head 0's q, k, v, then head
1's ...); the parameter is the engine's q | k | v (`QKVParallelLinear`), and its weight loader
reorders the rows of this rank's heads, which are one contiguous block of the checkpoint's.
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
    RowParallelLinear,
    VocabParallelEmbedding,
)
from engine.layers.alibi import rank_alibi_slopes
from engine.model_config import ModelConfig
from engine.models.causal_lm import CausalLM


class PerHeadQKVLinear(QKVParallelLinear):
    """q | k | v per rank, loaded from a checkpoint that interleaves them per head ([H, 3, D]
    rows, multi-head attention): the rank's heads are rows [rank * 3 H_r D, (rank + 1) * 3 H_r D)
    of the checkpoint tensor (weight [3 H D, hidden] or bias [3 H D]); only those are read."""

    def weight_loader(self, param: nn.Parameter, loaded_weight: WeightLike, shard_id: str | None = None) -> None:
        if shard_id is not None:
            super().weight_loader(param, loaded_weight, shard_id)
            return
        heads, head_dim = self.num_heads, self.head_size
        rows = 3 * heads * head_dim
        if loaded_weight.shape[0] != rows * self.tp_size or tuple(loaded_weight.shape[1:]) != tuple(param.shape[1:]):
            raise ValueError(
                f"weight shape mismatch: query_key_value needs {rows * self.tp_size} rows of "
                f"{tuple(param.shape[1:])}, checkpoint {tuple(loaded_weight.shape)}"
            )
        block = read_weight(loaded_weight.narrow(0, self.tp_rank * rows, rows))
        rest = tuple(block.shape[1:])
        # [H_r, 3, D, ...] -> [3, H_r, D, ...]: q of every head, then k, then v
        param.data.copy_(block.reshape(heads, 3, head_dim, *rest).transpose(0, 1).reshape(rows, *rest))


class BloomAttention(nn.Module):
    def __init__(self, shape: ModelConfig, layer_idx: int, slopes: torch.Tensor, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        hidden, head_dim = shape.hidden_size, shape.head_dim
        self.query_key_value = PerHeadQKVLinear(
            hidden, head_dim, shape.num_heads, shape.num_heads, True, tp_rank, tp_size
        )
        self.dense = RowParallelLinear(shape.num_heads * head_dim, hidden, True, tp_rank, tp_size)
        self.q_size = self.query_key_value.q_size
        self.attn = Attention(
            self.query_key_value.num_heads,
            self.query_key_value.num_kv_heads,
            head_dim,
            scale=head_dim**-0.5,
            layer_idx=layer_idx,
            alibi_slopes=slopes,
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        q, k, v = self.query_key_value(hidden).split([self.q_size] * 3, dim=-1)  # [T, H * D] each
        return self.dense(self.attn(q, k, v))


class BloomMLP(nn.Module):
    def __init__(self, shape: ModelConfig, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        hidden, inner = shape.hidden_size, shape.intermediate_size
        self.dense_h_to_4h = ColumnParallelLinear(hidden, inner, True, tp_rank, tp_size)
        self.dense_4h_to_h = RowParallelLinear(inner, hidden, True, tp_rank, tp_size)
        self.act = Activation("bloom_gelu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class BloomBlock(nn.Module):
    def __init__(
        self, config: Any, shape: ModelConfig, layer_idx: int, slopes: torch.Tensor, tp_rank: int, tp_size: int
    ) -> None:
        super().__init__()
        self.input_layernorm = LayerNorm(shape.hidden_size, shape.norm_eps)
        self.self_attention = BloomAttention(shape, layer_idx, slopes, tp_rank, tp_size)
        self.post_attention_layernorm = LayerNorm(shape.hidden_size, shape.norm_eps)
        self.mlp = BloomMLP(shape, tp_rank, tp_size)
        # Every released checkpoint adds the residual before the norms; the flag makes the
        # normed activations the residual instead.
        self.residual_after_norm = bool(getattr(config, "apply_residual_connection_post_layernorm", False))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [T, hidden_size] -> [T, hidden_size]
        normed = self.input_layernorm(hidden)
        hidden = self.self_attention(normed) + (normed if self.residual_after_norm else hidden)
        normed = self.post_attention_layernorm(hidden)
        return self.mlp(normed) + (normed if self.residual_after_norm else hidden)


class BloomModel(nn.Module):
    def __init__(self, config: Any, shape: ModelConfig, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(shape.vocab_size, shape.hidden_size, tp_rank, tp_size)
        self.word_embeddings_layernorm = LayerNorm(shape.hidden_size, shape.norm_eps)
        # One slopes tensor for every layer (the same heads): the torch path's per-step bias is
        # then computed once, not per layer.
        slopes = rank_alibi_slopes(shape.num_heads, tp_rank, tp_size).to(torch.get_default_device())
        self.h = nn.ModuleList(
            BloomBlock(config, shape, i, slopes, tp_rank, tp_size) for i in range(shape.num_layers)
        )
        self.ln_f = LayerNorm(shape.hidden_size, shape.norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.word_embeddings_layernorm(self.word_embeddings(input_ids))  # [T, hidden_size]
        for layer in self.h:
            hidden = layer(hidden)
        return self.ln_f(hidden)


class BloomForCausalLM(CausalLM):
    def __init__(self, config: Any, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        self.config = config
        shape = ModelConfig.from_hf_config(config)
        if shape.num_kv_heads != shape.num_heads:
            raise ValueError("BLOOM has one key/value head per query head; num_key_value_heads differs")
        self.transformer = BloomModel(config, shape, tp_rank, tp_size)
        self.lm_head = ParallelLMHead(shape.vocab_size, shape.hidden_size, tp_rank=tp_rank, tp_size=tp_size)
        self.tie_word_embeddings = shape.tie_word_embeddings
        if self.tie_word_embeddings:
            self.lm_head.tie_weights(self.transformer.word_embeddings)

    def checkpoint_weights(self, weights: Iterable[tuple[str, WeightLike]]) -> Iterator[tuple[str, WeightLike]]:
        """Names of a bare `BloomModel` checkpoint (`h.0....`, `word_embeddings.weight`) get
        the `transformer.` prefix; the layout needs no change here (see `PerHeadQKVLinear`)."""
        for name, tensor in weights:
            if not name.startswith(("transformer.", "lm_head.")):
                name = f"transformer.{name}"
            yield name, tensor

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # input_ids, positions: [T] int64 -> hidden [T, hidden_size] after the final norm. The
        # positions reach attention through the forward context (ALiBi), not through here.
        return self.transformer(input_ids)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, hidden_size] (the rows to sample) -> [N, vocab] float32
        return self.lm_head(hidden).float()
