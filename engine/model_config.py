"""The model's shape, read once from its transformers config.

A checkpoint's `config.json` leaves some sizes implicit: `num_key_value_heads` is absent when
every head has its own keys (multi-head attention), `head_dim` when it is hidden / heads, and a
multimodal wrapper keeps the decoder's sizes under `text_config`. `ModelConfig.from_hf_config`
resolves those fallbacks in one place; the engine core, the tensor-parallel checks, the model
runner and the model files read the resolved sizes from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def text_config(hf_config: Any) -> Any:
    """The decoder's config: `text_config` of a multimodal wrapper, else the config itself."""
    decoder = getattr(hf_config, "text_config", None)
    return hf_config if decoder is None else decoder


def _required(config: Any, name: str) -> Any:
    value = getattr(config, name, None)
    if value is None:
        raise ValueError(f"the model's config.json has no {name}")
    return value


# The names families give the norm's epsilon, in the order they are looked up.
_NORM_EPS_NAMES = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_epsilon", "layernorm_epsilon")
# A model with ALiBi (BLOOM) has no position table and no `max_position_embeddings`: its context
# is the length it was trained at, `seq_length` where the config keeps it, else this.
_ALIBI_DEFAULT_CONTEXT = 2048


def _norm_eps(config: Any) -> float:
    for name in _NORM_EPS_NAMES:
        value = getattr(config, name, None)
        if value is not None:
            return float(value)
    raise ValueError(f"the model's config.json has none of {', '.join(_NORM_EPS_NAMES)}")


def _max_positions(config: Any) -> int:
    value = getattr(config, "max_position_embeddings", None) or getattr(config, "seq_length", None)
    if value is None and getattr(config, "model_type", None) == "bloom":
        value = _ALIBI_DEFAULT_CONTEXT
    if value is None:
        raise ValueError("the model's config.json has no max_position_embeddings")
    return int(value)


def _num_kv_heads(config: Any, num_heads: int) -> int:
    if getattr(config, "model_type", None) == "gpt_bigcode":
        # `multi_query` decides: one kv head or one per head. The `num_key_value_heads` that
        # transformers derives from it can be stale (computed from the default head count when
        # the config is built with `num_attention_heads`, and saved so).
        return 1 if getattr(config, "multi_query", True) else num_heads
    return int(getattr(config, "num_key_value_heads", None) or num_heads)


def _expert_sizes(config: Any) -> tuple[tuple[str, int], ...]:
    """The expert widths of a model that has experts (a dense DeepSeek-V2 config still names a
    `moe_intermediate_size`: every layer before `first_k_dense_replace` is dense)."""
    experts = next((getattr(config, n, None) for n in ("num_local_experts", "num_experts", "n_routed_experts")
                    if getattr(config, n, None)), None)
    first_dense = getattr(config, "first_k_dense_replace", None)
    if not experts or (first_dense is not None and first_dense >= int(config.num_hidden_layers)):
        return ()
    return tuple(
        (name, int(getattr(config, name)))
        for name in ("moe_intermediate_size", "shared_expert_intermediate_size")
        if getattr(config, name, None)
    )


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Sizes of a decoder-only transformer (whole model, not one tensor-parallel rank's share)."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads: num_heads for multi-head, fewer for grouped-query attention
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    norm_eps: float  # RMSNorm's or LayerNorm's epsilon, whichever the family uses
    tie_word_embeddings: bool  # the LM head shares the input embedding's weight
    # Learned absolute positions (GPTBigCode's `wpe`): a table of max_position_embeddings rows,
    # so no sequence may run past it (rotary positions extend, a table does not).
    learned_positions: bool = False
    # Mixtures of experts: the widths split over the ranks besides intermediate_size (each
    # expert's, a shared expert's), named as the config names them; empty for a dense model.
    expert_sizes: tuple[tuple[str, int], ...] = ()
    # Multi-head latent attention (DeepSeek-V2): a token stores, per layer, one compressed latent
    # (`kv_lora_rank`) and one rotary key (`qk_rope_head_dim`) shared by every head, this many
    # values, instead of per-head keys and values; None for per-head K/V.
    kv_latent_dim: int | None = None

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> ModelConfig:
        """Read the sizes from a transformers config (its `text_config` for a multimodal
        wrapper); raises ValueError naming a size the config lacks."""
        config = text_config(hf_config)
        hidden_size = int(_required(config, "hidden_size"))
        num_heads = int(_required(config, "num_attention_heads"))
        # GPT-style configs (BLOOM, GPTBigCode) leave the MLP at 4 x hidden: `n_inner` None or absent
        intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
        return cls(
            num_layers=int(_required(config, "num_hidden_layers")),
            hidden_size=hidden_size,
            intermediate_size=int(intermediate or 4 * hidden_size),
            num_heads=num_heads,
            num_kv_heads=_num_kv_heads(config, num_heads),
            head_dim=int(getattr(config, "head_dim", None) or hidden_size // num_heads),
            vocab_size=int(_required(config, "vocab_size")),
            max_position_embeddings=_max_positions(config),
            norm_eps=_norm_eps(config),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            learned_positions=getattr(config, "model_type", None) == "gpt_bigcode",
            expert_sizes=_expert_sizes(config),
            kv_latent_dim=_kv_latent_dim(config),
        )


def _kv_latent_dim(config: Any) -> int | None:
    kv_lora_rank = getattr(config, "kv_lora_rank", None)
    if kv_lora_rank is None:
        return None
    return int(kv_lora_rank) + int(_required(config, "qk_rope_head_dim"))
