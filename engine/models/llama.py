"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, Phi-3): wiring only, over `engine/layers`.

A step's tokens are packed: input_ids [T] and positions [T] hold every sequence's new tokens
back to back; the attention layers find each sequence's keys through the ForwardContext.
Checkpoint names follow transformers (`model.layers.N.self_attn.q_proj.weight`, ...); the
separate q/k/v and gate/up tensors load into fused parameters via `packed_modules_mapping`,
and checkpoints that fuse them already (Phi-3's `qkv_proj`, `gate_up_proj`) load as they are.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from engine.layers import (
    Attention,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    SiluAndMul,
    VocabParallelEmbedding,
    get_rope,
)
from engine.model_config import ModelConfig
from engine.models.causal_lm import CausalLM
from engine.worker.forward_context import ForwardContext, get_forward_context


class FusedDecode(Protocol):
    """A decode-only step's whole layer in one op (engine/models/cpu_decode_layer.py)."""

    def usable(self, ctx: ForwardContext, hidden: torch.Tensor) -> bool: ...

    def __call__(
        self, ctx: ForwardContext, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class LlamaAttention(nn.Module):
    def __init__(
        self,
        shape: ModelConfig,
        layer_idx: int,
        rotary_emb: RotaryEmbedding,
        qkv_bias: bool,
        o_bias: bool,
        sliding_window: int | None,
        qk_norm: bool,
        tp_rank: int,
        tp_size: int,
    ) -> None:
        super().__init__()
        hidden, head_dim = shape.hidden_size, shape.head_dim
        self.qkv_proj = QKVParallelLinear(
            hidden, head_dim, shape.num_heads, shape.num_kv_heads, qkv_bias, tp_rank, tp_size
        )
        self.o_proj = RowParallelLinear(shape.num_heads * head_dim, hidden, o_bias, tp_rank, tp_size)
        self.rotary_emb = rotary_emb
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.head_dim = head_dim
        # Qwen3: an RMSNorm over each head's q and k (weights [head_dim], the same on every rank)
        self.q_norm = RMSNorm(head_dim, shape.norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, shape.norm_eps) if qk_norm else None
        self.attn = Attention(
            self.qkv_proj.num_heads,
            self.qkv_proj.num_kv_heads,
            head_dim,
            scale=head_dim**-0.5,
            layer_idx=layer_idx,
            sliding_window=sliding_window,
        )

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)  # [T, (H + 2 KV) * D]
        qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None and self.k_norm is not None:  # per head, before the rotation
            q, k = qk.split([self.q_size, self.kv_size], dim=-1)
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(q.shape)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(k.shape)
            qk = torch.cat([q, k], dim=-1)
        q, k = self.rotary_emb.forward_packed(positions, qk, self.q_size)
        return self.o_proj(self.attn(q, k, v))


class LlamaMLP(nn.Module):
    def __init__(
        self,
        shape: ModelConfig,
        bias: bool,
        tp_rank: int,
        tp_size: int,
        intermediate_size: int | None = None,
        reduce_results: bool = True,  # False: a partial sum over the ranks (a MoE's shared expert)
    ) -> None:
        super().__init__()
        inter = intermediate_size or shape.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            shape.hidden_size, [inter, inter], bias, tp_rank, tp_size
        )
        self.down_proj = RowParallelLinear(
            inter, shape.hidden_size, bias, tp_rank, tp_size, reduce_results=reduce_results
        )
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class PreNormDecoderLayer(nn.Module):
    """A decoder layer norm -> attention -> add, norm -> MLP -> add. Subclasses build
    `self_attn`, `mlp`, `input_layernorm` and `post_attention_layernorm` (RMSNorm or LayerNorm:
    both take `(x, residual)` and return `(normed, x + residual)`).

    `fused_decode`, set at load where the model chose the CPU kernels and the op computes this
    layer's wiring (engine/models/cpu_decode_layer.py), runs a decode-only step's layer in one op.
    """

    self_attn: nn.Module
    mlp: nn.Module
    input_layernorm: nn.Module
    post_attention_layernorm: nn.Module
    fused_decode: FusedDecode | None = None

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fused_decode is not None:
            ctx = get_forward_context()
            if self.fused_decode.usable(ctx, hidden):
                return self.fused_decode(ctx, positions, hidden, residual)
        # hidden / residual: [T, hidden_size]; the residual add is fused into the norms.
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaDecoderLayer(PreNormDecoderLayer):
    def __init__(
        self,
        config: Any,
        shape: ModelConfig,
        layer_idx: int,
        rotary_emb: RotaryEmbedding,
        arch: type[LlamaForCausalLM],
        tp_rank: int,
        tp_size: int,
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(
            shape,
            layer_idx,
            rotary_emb,
            qkv_bias=arch.qkv_bias(config),
            o_bias=arch.o_bias(config),
            sliding_window=arch.sliding_window_of(config, layer_idx),
            qk_norm=arch.qk_norm(config),
            tp_rank=tp_rank,
            tp_size=tp_size,
        )
        self.mlp = arch.mlp_of(config, shape, layer_idx, tp_rank, tp_size)
        self.input_layernorm = RMSNorm(shape.hidden_size, shape.norm_eps)
        self.post_attention_layernorm = RMSNorm(shape.hidden_size, shape.norm_eps)



class LlamaModel(nn.Module):
    def __init__(
        self, config: Any, shape: ModelConfig, arch: type[LlamaForCausalLM], tp_rank: int, tp_size: int
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(shape.vocab_size, shape.hidden_size, tp_rank, tp_size)
        rotary_emb = arch.rotary_of(config, shape.head_dim)  # shared by every layer (one cos/sin cache)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, shape, i, rotary_emb, arch, tp_rank, tp_size)
            for i in range(shape.num_layers)
        )
        self.norm = RMSNorm(shape.hidden_size, shape.norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, inputs_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        # inputs_embeds: [T, hidden_size] in place of the tokens' (a vision-language model's images)
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [T, hidden_size]
        residual: torch.Tensor | None = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(CausalLM):
    # checkpoint name part -> (fused parameter name part, shard id for its weight_loader)
    packed_modules_mapping: dict[str, tuple[str, str | int]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: Any, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        self.config = config
        shape = ModelConfig.from_hf_config(config)
        self.model = LlamaModel(config, shape, type(self), tp_rank, tp_size)
        self.lm_head = ParallelLMHead(shape.vocab_size, shape.hidden_size, tp_rank=tp_rank, tp_size=tp_size)
        self.tie_word_embeddings = shape.tie_word_embeddings
        if self.tie_word_embeddings:
            self.lm_head.tie_weights(self.model.embed_tokens)

    # ---- per-architecture knobs (overridden by the subclasses below) ----------------------

    @classmethod
    def qkv_bias(cls, config: Any) -> bool:
        return bool(getattr(config, "attention_bias", False))

    @classmethod
    def o_bias(cls, config: Any) -> bool:
        return bool(getattr(config, "attention_bias", False))

    @classmethod
    def qk_norm(cls, config: Any) -> bool:
        return False

    @classmethod
    def mlp_of(cls, config: Any, shape: ModelConfig, layer_idx: int, tp_rank: int, tp_size: int) -> nn.Module:
        """Layer `layer_idx`'s MLP: [T, hidden] -> [T, hidden], reduced over the ranks."""
        return LlamaMLP(shape, bool(getattr(config, "mlp_bias", False)), tp_rank, tp_size)

    @classmethod
    def rotary_of(cls, config: Any, head_dim: int) -> RotaryEmbedding:
        return get_rope(config, head_dim)

    @classmethod
    def sliding_window_of(cls, config: Any, layer_idx: int) -> int | None:
        layer_types = getattr(config, "layer_types", None)
        if layer_types and layer_types[layer_idx] == "sliding_attention":
            return getattr(config, "sliding_window", None)
        return None

    # ---- forward --------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # input_ids, positions: [T] int64 -> hidden [T, hidden_size] after the final norm
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, hidden_size] (the rows to sample) -> [N, vocab] float32
        return self.lm_head(hidden).float()


class MistralForCausalLM(LlamaForCausalLM):
    """Llama with a sliding window over every layer when `config.sliding_window` is set."""

    @classmethod
    def sliding_window_of(cls, config: Any, layer_idx: int) -> int | None:
        if getattr(config, "layer_types", None):
            return super().sliding_window_of(config, layer_idx)
        return getattr(config, "sliding_window", None)


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Llama with biases on q/k/v (not on o_proj)."""

    @classmethod
    def qkv_bias(cls, config: Any) -> bool:
        return True

    @classmethod
    def o_bias(cls, config: Any) -> bool:
        return False


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Llama with an RMSNorm over each head's q and k before the rotation (no q/k/v biases
    unless `attention_bias`); sliding windows, where used, come from `layer_types`."""

    @classmethod
    def qk_norm(cls, config: Any) -> bool:
        return True


class Phi3ForCausalLM(MistralForCausalLM):
    """Llama whose checkpoints fuse q | k | v and gate | up (the parameters' own layout), with
    `config.sliding_window` over every layer and, in some, a partial rotation. The long-context
    variants' `longrope` scaling is not supported (the rotary embedding says so at load)."""
