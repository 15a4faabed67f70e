"""StableLM (`StableLmForCausalLM`: stablelm-2, stablelm-3b-4e1t, zephyr): wiring only.

A Llama-shaped decoder with LayerNorm (with bias) instead of RMSNorm and a rotation of the
first `partial_rotary_factor` of each head. Per checkpoint: biases on q/k/v (`use_qkv_bias`),
a LayerNorm of its own for every head of q and k (`qk_layernorm`, stablelm-2-12b), and the
parallel residual (`use_parallel_residual`: attention and MLP read the same normed input and
both add to the residual stream, with no second norm).

The attention and decoder layer here also serve Cohere (`engine/models/cohere.py`): the
differences between the two families are the class-level switches of `StableLmForCausalLM`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from engine.distributed.lazy_weight import WeightLike, read_weight
from engine.layers import (
    Attention,
    HeadLayerNorm,
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
from engine.models.llama import LlamaForCausalLM, LlamaMLP


class HeadNormAttention(nn.Module):
    """Attention with optional per-head q/k LayerNorms (before the rotation) and an optional
    rotation (`rotary_emb` None: no position information in this layer, Cohere2's global
    layers)."""

    def __init__(
        self,
        shape: ModelConfig,
        layer_idx: int,
        rotary_emb: RotaryEmbedding | None,
        arch: type[StableLmForCausalLM],
        config: Any,
        tp_rank: int,
        tp_size: int,
    ) -> None:
        super().__init__()
        hidden, head_dim = shape.hidden_size, shape.head_dim
        self.qkv_proj = QKVParallelLinear(
            hidden, head_dim, shape.num_heads, shape.num_kv_heads, arch.qkv_bias(config), tp_rank, tp_size
        )
        self.o_proj = RowParallelLinear(
            shape.num_heads * head_dim, hidden, arch.o_bias(config), tp_rank, tp_size
        )
        self.rotary_emb = rotary_emb
        qkv = self.qkv_proj
        self.q_size, self.kv_size, self.head_dim = qkv.q_size, qkv.kv_size, head_dim
        self.q_norm: HeadLayerNorm | None = None
        self.k_norm: HeadLayerNorm | None = None
        if arch.qk_norm(config):  # each rank normalises its own heads (a replicated kv head: its one)
            kv_rank = tp_rank // qkv.num_kv_head_replicas
            self.q_norm = HeadLayerNorm(
                qkv.num_heads, head_dim, shape.norm_eps, tp_rank * qkv.num_heads, shape.num_heads
            )
            self.k_norm = HeadLayerNorm(
                qkv.num_kv_heads, head_dim, shape.norm_eps, kv_rank * qkv.num_kv_heads, shape.num_kv_heads
            )
        self.attn = Attention(
            qkv.num_heads,
            qkv.num_kv_heads,
            head_dim,
            scale=head_dim**-0.5,
            layer_idx=layer_idx,
            sliding_window=arch.sliding_window_of(config, layer_idx),
        )

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)  # [T, (H + 2 KV) * D]
        qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = qk.split([self.q_size, self.kv_size], dim=-1)
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(q.shape)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(k.shape)
            qk = torch.cat([q, k], dim=-1)
        if self.rotary_emb is None:
            q, k = qk.split([self.q_size, self.kv_size], dim=-1)
        else:
            q, k = self.rotary_emb.forward_packed(positions, qk, self.q_size)
        return self.o_proj(self.attn(q, k, v))


class LayerNormDecoderLayer(nn.Module):
    """LayerNorm -> attention -> (LayerNorm ->) MLP. Sequential: the MLP reads the norm of the
    stream after the attention's add. Parallel: attention and MLP read the same normed input and
    their sum is added once (`post_attention_layernorm` is None)."""

    def __init__(
        self,
        config: Any,
        shape: ModelConfig,
        layer_idx: int,
        rotary_emb: RotaryEmbedding | None,
        arch: type[StableLmForCausalLM],
        tp_rank: int,
        tp_size: int,
    ) -> None:
        super().__init__()
        self.self_attn = HeadNormAttention(shape, layer_idx, rotary_emb, arch, config, tp_rank, tp_size)
        self.mlp = LlamaMLP(shape, False, tp_rank, tp_size)
        bias = arch.norm_bias(config)
        self.input_layernorm = LayerNorm(shape.hidden_size, shape.norm_eps, bias)
        self.post_attention_layernorm: LayerNorm | None = None
        if not arch.parallel_residual(config):
            self.post_attention_layernorm = LayerNorm(shape.hidden_size, shape.norm_eps, bias)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # hidden / residual: [T, hidden_size]; the residual add is fused into the norms, so the
        # stream is residual + hidden (hidden: the last layer's output not yet added).
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        attn_out = self.self_attn(positions, hidden)
        if self.post_attention_layernorm is None:
            return attn_out + self.mlp(hidden), residual
        hidden, residual = self.post_attention_layernorm(attn_out, residual)
        return self.mlp(hidden), residual


class StableLmModel(nn.Module):
    def __init__(
        self, config: Any, shape: ModelConfig, arch: type[StableLmForCausalLM], tp_rank: int, tp_size: int
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(shape.vocab_size, shape.hidden_size, tp_rank, tp_size)
        rotary_emb = get_rope(config, shape.head_dim)  # shared by every layer that rotates
        self.layers = nn.ModuleList(
            LayerNormDecoderLayer(
                config, shape, i, rotary_emb if arch.rotates(config, i) else None, arch, tp_rank, tp_size
            )
            for i in range(shape.num_layers)
        )
        self.norm = LayerNorm(shape.hidden_size, shape.norm_eps, arch.norm_bias(config))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # [T, hidden_size]
        residual: torch.Tensor | None = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


# transformers' StableLM keeps one LayerNorm module per head: `...q_layernorm.norms.{head}.weight`
_PER_HEAD_NORM = re.compile(r"(.+\.self_attn\.)([qk])_layernorm\.norms\.(\d+)\.weight$")


class StableLmForCausalLM(CausalLM):
    packed_modules_mapping = LlamaForCausalLM.packed_modules_mapping

    def __init__(self, config: Any, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        act = getattr(config, "hidden_act", "silu")
        if act not in ("silu", "swish"):  # the MLP is SwiGLU (SiluAndMul) in every checkpoint of these
            raise ValueError(f"unsupported hidden_act {act!r} for {type(self).__name__}: only silu")
        self.config = config
        shape = ModelConfig.from_hf_config(config)
        self.shape = shape
        self.model = StableLmModel(config, shape, type(self), tp_rank, tp_size)
        self.lm_head = ParallelLMHead(shape.vocab_size, shape.hidden_size, tp_rank=tp_rank, tp_size=tp_size)
        self.tie_word_embeddings = shape.tie_word_embeddings
        if self.tie_word_embeddings:
            self.lm_head.tie_weights(self.model.embed_tokens)
        self.logit_scale = type(self).logit_scale_of(config)

    # ---- per-architecture knobs (overridden by Cohere) -------------------------------------

    @classmethod
    def qkv_bias(cls, config: Any) -> bool:
        return bool(getattr(config, "use_qkv_bias", False))

    @classmethod
    def o_bias(cls, config: Any) -> bool:
        return False

    @classmethod
    def qk_norm(cls, config: Any) -> bool:
        return bool(getattr(config, "qk_layernorm", False))

    @classmethod
    def norm_bias(cls, config: Any) -> bool:
        return True

    @classmethod
    def parallel_residual(cls, config: Any) -> bool:
        return bool(getattr(config, "use_parallel_residual", False))

    @classmethod
    def sliding_window_of(cls, config: Any, layer_idx: int) -> int | None:
        return None

    @classmethod
    def rotates(cls, config: Any, layer_idx: int) -> bool:
        return True

    @classmethod
    def logit_scale_of(cls, config: Any) -> float:
        return 1.0

    # ---- checkpoint -----------------------------------------------------------------------

    def checkpoint_weights(self, weights: Iterable[tuple[str, WeightLike]]) -> Iterator[tuple[str, WeightLike]]:
        """transformers' per-head q/k norms (`q_layernorm.norms.{head}.weight`, [head_dim] each)
        stacked into the [heads, head_dim] `q_norm.weight` a `HeadLayerNorm` loads (the layout
        of llama.cpp's GGUF files and of Cohere's checkpoints)."""
        pending: dict[str, dict[int, torch.Tensor]] = {}
        for name, tensor in weights:
            match = _PER_HEAD_NORM.match(name)
            if match is None:
                yield name, tensor
                continue
            prefix, which, head = match.group(1), match.group(2), int(match.group(3))
            heads = pending.setdefault(prefix + which, {})
            heads[head] = read_weight(tensor)  # [head_dim]: read now, while its file is open
            num_heads = self.shape.num_heads if which == "q" else self.shape.num_kv_heads
            if len(heads) == num_heads:
                yield f"{prefix}{which}_norm.weight", torch.stack([heads[i] for i in range(num_heads)])
                del pending[prefix + which]
        if pending:
            raise ValueError(f"checkpoint has per-head norms of only some heads: {sorted(pending)[:3]}")

    # ---- forward --------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # input_ids, positions: [T] int64 -> hidden [T, hidden_size] after the final norm
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, hidden_size] (the rows to sample) -> [N, vocab] float32
        logits = self.lm_head(hidden).float()
        return logits * self.logit_scale if self.logit_scale != 1.0 else logits
