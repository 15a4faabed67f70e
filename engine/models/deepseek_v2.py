"""DeepSeek-V2 (`DeepseekV2ForCausalLM`): multi-head latent attention (engine/layers/mla.py) in a
Llama-style pre-norm decoder whose MLPs are dense in the first layers and mixtures of experts
after them.

Attention of one layer, for H heads (this rank's), per token:
- q: `q_proj` [H * (dn + dr)], or the low-rank path q_a_proj -> q_a_layernorm -> q_b_proj when
  `q_lora_rank` is set; each head's first dn values are q_nope, the last dr q_pe.
- kv_a_proj_with_mqa -> [latent (kv_lora_rank) | k_pe (dr)]; the latent goes through
  kv_a_layernorm; q_pe and k_pe rotate (one k_pe for every head).
- `MLAAttention` stores [latent | k_pe] and attends, expanding latents through kv_b_proj to
  per-head k_nope [dn] / v [dv] or absorbing kv_b_proj into the queries; o_proj.
Softmax scale (dn + dr)^-0.5, times mscale(factor, mscale_all_dim)^2 with YaRN rope scaling
(the rotary part's own factor is folded into cos and sin by `RotaryEmbedding`).

Checkpoints rotate the interleaved pairs (x0, x1), (x2, x3), ... of q_pe and k_pe;
`checkpoint_weights` reorders those rows of q_proj / q_b_proj and kv_a_proj_with_mqa to the
`rotate_half` layout (every q . k unchanged), lazily, so that a rank reads only its heads.

Tensor parallelism: heads split across ranks (q_proj / q_b_proj and kv_b_proj column-parallel
by heads, o_proj row-parallel); q_a_proj, kv_a_proj_with_mqa and the latent are replicated.

The MLP of each layer comes from `_make_mlp`: a layer at or past `first_k_dense_replace` (every
`moe_layer_freq`-th) with `n_routed_experts` set is a mixture of experts (`SparseMoeBlock`),
the others a dense SiLU-gated MLP. A mixture-of-experts layer:
- router `mlp.gate` [E, hidden], its logits and softmax in float32 (the model's dtype elsewhere);
- top `num_experts_per_tok` experts by probability, `topk_method` "greedy" (V2-Lite) or
  "group_limited_greedy" (DeepSeek-V2: the `topk_group` best of `n_group` groups first);
- the chosen probabilities times `routed_scaling_factor`, not renormalised: transformers'
  DeepSeek-V2 leaves `norm_topk_prob` unused (the released checkpoints set it false);
- `n_shared_experts` shared experts, one SiLU-gated MLP of `n_shared_experts *
  moe_intermediate_size` (`mlp.shared_experts`) that every token runs, ungated, added.
Checkpoint names: `mlp.experts.E.{gate,up,down}_proj` (stacked into the experts' parameters),
`mlp.shared_experts.*` (loaded as `mlp.shared_expert.*`). Tensor parallelism: each expert and
the shared experts split as a dense MLP is, router replicated, one all-reduce per layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from engine.distributed.lazy_weight import LazyWeight, WeightLike, read_weight
from engine.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    ReplicatedLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
    interleaved_to_half_rows,
    rope_parameters_from_config,
)
from engine.layers.mla import MLAAttention
from engine.layers.moe import Routing, SparseMoeBlock, expert_packed_mapping
from engine.layers.rotary import yarn_mscale
from engine.model_config import ModelConfig
from engine.models.causal_lm import CausalLM
from engine.models.llama import LlamaMLP, PreNormDecoderLayer
from engine.models.moe import stacked_expert_name

# transformers' DeepseekV2RMSNorm default: q_a_layernorm and kv_a_layernorm do not take rms_norm_eps
_LORA_NORM_EPS = 1e-6


def softmax_scale(config: Any) -> float:
    """(qk_nope_head_dim + qk_rope_head_dim)^-0.5, times mscale(factor, mscale_all_dim)^2 when the
    rope is scaled (DeepSeek's YaRN) and `mscale_all_dim` is set."""
    scale = float(config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    params = rope_parameters_from_config(config)
    mscale_all_dim = params.get("mscale_all_dim")
    if params["rope_type"] != "default" and mscale_all_dim:
        mscale = yarn_mscale(float(params["factor"]), float(mscale_all_dim))
        scale *= mscale * mscale
    return scale


def is_moe_layer(config: Any, layer_idx: int) -> bool:
    """Whether layer `layer_idx` of a DeepSeek-V2 config has a mixture-of-experts MLP."""
    if getattr(config, "n_routed_experts", None) is None:
        return False
    first_dense = int(getattr(config, "first_k_dense_replace", 0) or 0)
    freq = int(getattr(config, "moe_layer_freq", 1) or 1)
    return layer_idx >= first_dense and layer_idx % freq == 0


def routing_of(config: Any) -> Routing:
    """The experts' routing as the config sets it (softmax scores; greedy or grouped top-k)."""
    scoring = getattr(config, "scoring_func", "softmax") or "softmax"
    method = getattr(config, "topk_method", "greedy") or "greedy"
    if scoring != "softmax" or method not in ("greedy", "group_limited_greedy"):
        raise ValueError(
            f"DeepSeek-V2 routing with scoring_func={scoring!r}, topk_method={method!r} is not supported "
            "(softmax scores with topk_method 'greedy' or 'group_limited_greedy' are)"
        )
    groups = (1, 1)
    if method == "group_limited_greedy":
        if not getattr(config, "n_group", None) or not getattr(config, "topk_group", None):
            raise ValueError("topk_method 'group_limited_greedy' needs n_group and topk_group in config.json")
        groups = (int(config.n_group), int(config.topk_group))
    return Routing(
        int(config.num_experts_per_tok or 0),
        renormalize=False,
        routed_scaling_factor=float(getattr(config, "routed_scaling_factor", 1.0) or 1.0),
        num_groups=groups[0],
        topk_groups=groups[1],
    )


def _make_mlp(config: Any, shape: ModelConfig, layer_idx: int, tp_rank: int, tp_size: int) -> nn.Module:
    """The MLP of layer `layer_idx`: the one place that chooses between dense and MoE."""
    bias = bool(getattr(config, "mlp_bias", False))
    if not is_moe_layer(config, layer_idx):
        return LlamaMLP(shape, bias, tp_rank, tp_size)
    inter = int(config.moe_intermediate_size)
    shared_size = int(getattr(config, "n_shared_experts", 0) or 0) * inter
    shared = LlamaMLP(shape, bias, tp_rank, tp_size, shared_size, reduce_results=False) if shared_size else None
    return SparseMoeBlock(
        shape.hidden_size, int(config.n_routed_experts), inter, routing_of(config), tp_rank, tp_size,
        shared_expert=shared, router_float32=True,
    )


class DeepseekV2Attention(nn.Module):
    def __init__(
        self, config: Any, layer_idx: int, rotary_emb: RotaryEmbedding, tp_rank: int, tp_size: int
    ) -> None:
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.kv_lora_rank, self.v_dim = config.kv_lora_rank, config.v_head_dim
        self.qk_dim = self.nope_dim + self.rope_dim
        self.num_heads = heads // tp_size  # on this rank
        bias = bool(getattr(config, "attention_bias", False))
        self.q_lora_rank = getattr(config, "q_lora_rank", None)
        if self.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(hidden, heads * self.qk_dim, False, tp_rank, tp_size)
        else:
            self.q_a_proj = ReplicatedLinear(hidden, self.q_lora_rank, bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, _LORA_NORM_EPS)
            self.q_b_proj = ColumnParallelLinear(self.q_lora_rank, heads * self.qk_dim, False, tp_rank, tp_size)
        self.kv_a_proj_with_mqa = ReplicatedLinear(hidden, self.kv_lora_rank + self.rope_dim, bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, _LORA_NORM_EPS)
        self.kv_b_proj = ColumnParallelLinear(
            self.kv_lora_rank, heads * (self.nope_dim + self.v_dim), False, tp_rank, tp_size
        )
        self.o_proj = RowParallelLinear(heads * self.v_dim, hidden, bias, tp_rank, tp_size)
        self.rotary_emb = rotary_emb
        self.attn = MLAAttention(
            self.num_heads, self.kv_lora_rank, self.nope_dim, self.rope_dim, self.v_dim,
            softmax_scale(config), layer_idx, self.kv_b_proj,
        )

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        # hidden [T, hidden_size] -> [T, hidden_size]
        num_tokens = hidden.shape[0]
        if self.q_lora_rank is None:
            q = self.q_proj(hidden)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        q_nope, q_pe = q.view(num_tokens, self.num_heads, self.qk_dim).split([self.nope_dim, self.rope_dim], -1)
        latent, k_pe = self.kv_a_proj_with_mqa(hidden).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent.contiguous())
        # contiguous [T, H * dr] / [T, dr] for the rotary kernel, which rotates them in place
        q_pe, k_pe = self.rotary_emb(positions, q_pe.reshape(num_tokens, -1), k_pe.contiguous())
        out = self.attn(q_nope, q_pe.view(num_tokens, self.num_heads, self.rope_dim), latent, k_pe)
        return self.o_proj(out)


class DeepseekV2DecoderLayer(PreNormDecoderLayer):
    def __init__(
        self, config: Any, shape: ModelConfig, layer_idx: int, rotary_emb: RotaryEmbedding, tp_rank: int,
        tp_size: int,
    ) -> None:
        super().__init__()
        self.self_attn = DeepseekV2Attention(config, layer_idx, rotary_emb, tp_rank, tp_size)
        self.mlp = _make_mlp(config, shape, layer_idx, tp_rank, tp_size)
        self.input_layernorm = RMSNorm(shape.hidden_size, shape.norm_eps)
        self.post_attention_layernorm = RMSNorm(shape.hidden_size, shape.norm_eps)


def get_mla_rope(config: Any) -> RotaryEmbedding:
    """The rotary embedding of the qk_rope_head_dim part (YaRN as the config asks)."""
    dim = int(config.qk_rope_head_dim)
    max_position = int(getattr(config, "max_position_embeddings", 4096) or 4096)
    return RotaryEmbedding(dim, dim, max_position, rope_parameters_from_config(config))


class DeepseekV2Model(nn.Module):
    def __init__(self, config: Any, shape: ModelConfig, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(shape.vocab_size, shape.hidden_size, tp_rank, tp_size)
        rotary_emb = get_mla_rope(config)  # shared by every layer
        self.layers = nn.ModuleList(
            DeepseekV2DecoderLayer(config, shape, i, rotary_emb, tp_rank, tp_size) for i in range(shape.num_layers)
        )
        self.norm = RMSNorm(shape.hidden_size, shape.norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        residual: torch.Tensor | None = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class DeepseekV2ForCausalLM(CausalLM):
    packed_modules_mapping: dict[str, tuple[str, str | int]] = {
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    # Packed steps' MLA runs the torch path on CUDA too (decode steps take the MLA decode kernel):
    # no prefill graphs.
    triton_attention = False

    def __init__(self, config: Any, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        self.config = config
        self.shape = ModelConfig.from_hf_config(config)
        if getattr(config, "n_routed_experts", None):
            self.packed_modules_mapping = {
                **type(self).packed_modules_mapping,
                **expert_packed_mapping(int(config.n_routed_experts), ("gate_proj", "up_proj", "down_proj")),
            }
        if config.num_attention_heads % tp_size:
            raise ValueError(
                f"num_attention_heads={config.num_attention_heads} is not divisible by tensor_parallel_size={tp_size}"
            )
        self.model = DeepseekV2Model(config, self.shape, tp_rank, tp_size)
        self.lm_head = ParallelLMHead(
            self.shape.vocab_size, self.shape.hidden_size, tp_rank=tp_rank, tp_size=tp_size
        )
        self.tie_word_embeddings = self.shape.tie_word_embeddings
        if self.tie_word_embeddings:
            self.lm_head.tie_weights(self.model.embed_tokens)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def checkpoint_weights(self, weights: Iterable[tuple[str, WeightLike]]) -> Iterator[tuple[str, WeightLike]]:
        """The rotary rows of q_proj / q_b_proj (the last dr of each head's dn + dr) and of
        kv_a_proj_with_mqa (its last dr) reordered from interleaved pairs to `rotate_half`;
        `mlp.shared_experts` renamed to the block's `shared_expert`, stacked experts mapped."""
        config = self.config
        qk_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        kv_a_dim = config.kv_lora_rank + config.qk_rope_head_dim
        for name, tensor in weights:
            if name.endswith((".self_attn.q_proj.weight", ".self_attn.q_b_proj.weight")):
                yield name, _rope_half_rows(tensor, qk_dim, config.qk_rope_head_dim)
            elif ".self_attn.kv_a_proj_with_mqa." in name:
                yield name, _rope_half_rows(tensor, kv_a_dim, config.qk_rope_head_dim)
            else:
                yield stacked_expert_name(name.replace(".mlp.shared_experts.", ".mlp.shared_expert.")), tensor


class _RopeHalfRowsSource:
    """A projection's rows (weight [H * D, in] or bias [H * D]) whose last `rope_dim` rows of
    each head of D are in the interleaved rotary layout, seen in the `rotate_half` one. Reading
    rows of whole heads reads only those rows (of a lazy tensor) and reorders each head's
    rotary rows."""

    def __init__(self, weight: WeightLike, head_dim: int, rope_dim: int) -> None:
        self.weight, self.head_dim, self.rope_dim = weight, head_dim, rope_dim

    def __getitem__(self, index: tuple[slice, ...]) -> torch.Tensor:
        region = self.weight
        for dim, part in enumerate(index):
            region = region.narrow(dim, part.start, part.stop - part.start)
        rows = index[0]
        if rows.start % self.head_dim or rows.stop % self.head_dim:
            raise ValueError(f"rows [{rows.start}, {rows.stop}) do not cover whole heads of {self.head_dim}")
        tensor = read_weight(region)
        heads = tensor.shape[0] // self.head_dim
        per_head = tensor.reshape(heads, self.head_dim, *tensor.shape[1:])
        nope, rope = per_head.split([self.head_dim - self.rope_dim, self.rope_dim], dim=1)
        rope = interleaved_to_half_rows(rope.reshape(heads * self.rope_dim, *tensor.shape[1:]), heads)
        return torch.cat((nope, rope.view(heads, self.rope_dim, *tensor.shape[1:])), dim=1).view(tensor.shape)


def _rope_half_rows(weight: WeightLike, head_dim: int, rope_dim: int) -> LazyWeight:
    dtype_name = weight.dtype_name if isinstance(weight, LazyWeight) else None
    return LazyWeight(_RopeHalfRowsSource(weight, head_dim, rope_dim), weight.shape, dtype_name=dtype_name)
