"""Mixture-of-experts decoders over the Llama wiring: Mixtral, Qwen2-MoE, Qwen3-MoE.

Attention and the decoder layer are Llama's (`engine.models.llama`); what differs is the MLP
(`LlamaForCausalLM.mlp_of`): a `SparseMoeBlock` (`engine.layers.moe`) in the sparse layers, a dense
`LlamaMLP` in the layers a config keeps dense (`mlp_only_layers`, `decoder_sparse_step`).

- Mixtral: every layer sparse, softmax top-k renormalised over the chosen experts; checkpoint
  names `block_sparse_moe.gate`, `block_sparse_moe.experts.N.w1 / w3 / w2` (gate, up, down).
- Qwen2-MoE: top-k softmax weights renormalised only with `norm_topk_prob`; a shared expert
  every token runs, scaled by sigmoid(`shared_expert_gate`); q/k/v biases (`qkv_bias`).
- Qwen3-MoE: as Qwen2-MoE without the shared expert, with Qwen3's q/k norms.

Per-expert checkpoint tensors (`mlp.experts.N.gate_proj.weight`, ...) load into the stacked
expert weights through `packed_modules_mapping`; checkpoints that stack them already
(`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`) load whole.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from engine.distributed.lazy_weight import WeightLike
from engine.layers.moe import Routing, SparseMoeBlock, expert_packed_mapping
from engine.model_config import ModelConfig
from engine.models.llama import (
    LlamaForCausalLM,
    LlamaMLP,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)

# Stacked expert tensors as some checkpoints store them -> the parameters that take them whole.
_STACKED_NAMES = {".experts.gate_up_proj": ".experts.gate_up.weight", ".experts.down_proj": ".experts.down.weight"}


def stacked_expert_name(name: str) -> str:
    """A checkpoint name of stacked experts (`mlp.experts.gate_up_proj`) -> the parameter that
    takes it whole; any other name unchanged."""
    for stacked, param in _STACKED_NAMES.items():
        if name.endswith(stacked):
            return name[: -len(stacked)] + param
    return name


def _num_experts(config: Any) -> int:
    value = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    if not value:
        raise ValueError("the model's config.json has no num_experts / num_local_experts")
    return int(value)


def _is_sparse_layer(config: Any, layer_idx: int) -> bool:
    """Qwen-MoE's rule: sparse unless listed in `mlp_only_layers`, every `decoder_sparse_step`-th."""
    if layer_idx in (getattr(config, "mlp_only_layers", None) or []):
        return False
    step = int(getattr(config, "decoder_sparse_step", 1) or 1)
    return _num_experts(config) > 0 and (layer_idx + 1) % step == 0


class _MoeMixin(LlamaForCausalLM):
    """Sets the per-expert checkpoint names into `packed_modules_mapping` and maps stacked
    expert tensors to their parameters."""

    # the checkpoint's names for each expert's (gate, up, down) projections
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, config: Any, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__(config, tp_rank, tp_size)
        self.packed_modules_mapping = {
            **type(self).packed_modules_mapping,
            **expert_packed_mapping(_num_experts(config), self.expert_names),
        }

    def checkpoint_weights(self, weights: Iterable[tuple[str, WeightLike]]) -> Iterable[tuple[str, WeightLike]]:
        for name, tensor in weights:
            yield stacked_expert_name(name), tensor

    @classmethod
    def routing(cls, config: Any) -> Routing:
        return Routing(int(config.num_experts_per_tok), bool(getattr(config, "norm_topk_prob", False)))

    @classmethod
    def moe_block(cls, config: Any, shape: ModelConfig, tp_rank: int, tp_size: int) -> SparseMoeBlock:
        inter = int(getattr(config, "moe_intermediate_size", None) or shape.intermediate_size)
        return SparseMoeBlock(
            shape.hidden_size, _num_experts(config), inter, cls.routing(config), tp_rank, tp_size
        )

    @classmethod
    def mlp_of(cls, config: Any, shape: ModelConfig, layer_idx: int, tp_rank: int, tp_size: int) -> nn.Module:
        if _is_sparse_layer(config, layer_idx):
            return cls.moe_block(config, shape, tp_rank, tp_size)
        return LlamaMLP(shape, False, tp_rank, tp_size)


class MixtralForCausalLM(_MoeMixin, MistralForCausalLM):
    """Every layer sparse, the chosen experts' weights renormalised to sum to 1; a sliding
    window over every layer when `config.sliding_window` is set."""

    expert_names = ("w1", "w3", "w2")

    def checkpoint_weights(self, weights: Iterable[tuple[str, WeightLike]]) -> Iterable[tuple[str, WeightLike]]:
        renamed = ((name.replace(".block_sparse_moe.", ".mlp."), tensor) for name, tensor in weights)
        return super().checkpoint_weights(renamed)

    @classmethod
    def routing(cls, config: Any) -> Routing:
        return Routing(int(config.num_experts_per_tok), renormalize=True)

    @classmethod
    def mlp_of(cls, config: Any, shape: ModelConfig, layer_idx: int, tp_rank: int, tp_size: int) -> nn.Module:
        return cls.moe_block(config, shape, tp_rank, tp_size)


class Qwen2MoeForCausalLM(_MoeMixin, Qwen2ForCausalLM):
    """Qwen2 attention (q/k/v biases per `qkv_bias`) with sparse layers that add a shared
    expert, gated by sigmoid(`shared_expert_gate`), to the routed ones."""

    @classmethod
    def qkv_bias(cls, config: Any) -> bool:
        return bool(getattr(config, "qkv_bias", True))

    @classmethod
    def moe_block(cls, config: Any, shape: ModelConfig, tp_rank: int, tp_size: int) -> SparseMoeBlock:
        shared_size = int(getattr(config, "shared_expert_intermediate_size", 0) or 0)
        shared = LlamaMLP(shape, False, tp_rank, tp_size, shared_size, reduce_results=False) if shared_size else None
        return SparseMoeBlock(
            shape.hidden_size,
            _num_experts(config),
            int(config.moe_intermediate_size),
            cls.routing(config),
            tp_rank,
            tp_size,
            shared_expert=shared,
            shared_expert_gate=shared is not None,
        )


class Qwen3MoeForCausalLM(_MoeMixin, Qwen3ForCausalLM):
    """Qwen3 attention (q/k norms) with sparse layers of routed experts only; the sliding
    window, where `use_sliding_window` sets it, covers every layer."""

    @classmethod
    def sliding_window_of(cls, config: Any, layer_idx: int) -> int | None:
        if getattr(config, "layer_types", None):
            return super().sliding_window_of(config, layer_idx)
        return getattr(config, "sliding_window", None)
