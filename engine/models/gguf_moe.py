"""GGUF files of mixture-of-experts models (llama.cpp's `qwen2moe`, `qwen3moe`, and Mixtral as
`llama` with experts): the tensor names and config fields `engine.models.gguf` adds for them.

llama.cpp stacks each layer's experts in one tensor per projection (`ffn_gate_exps`,
`ffn_up_exps` [E, I, H], `ffn_down_exps` [E, H, I]); the converted directory has one tensor per
expert under transformers' names (`mlp.experts.N.gate_proj.weight`, Mixtral's
`block_sparse_moe.experts.N.w1.weight`), as a downloaded checkpoint has. The router is
`ffn_gate_inp`; Qwen2-MoE's shared expert is `ffn_*_shexp`, its gate `ffn_gate_inp_shexp`
(stored [H], transformers' [1, H]). Mixtral files written before llama.cpp stacked the experts
keep one tensor per expert (`blk.N.ffn_gate.E.weight`); those load too.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from engine.models.gguf_metadata import metadata_value
from engine.models.gguf_tensors import Planned, TensorRef, split_experts

# llama.cpp block tensor -> transformers name; `*` is the expert index of a stacked tensor.
MOE_BLOCK_NAMES = {
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.*.gate_proj",
    "ffn_up_exps": "mlp.experts.*.up_proj",
    "ffn_down_exps": "mlp.experts.*.down_proj",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
# Mixtral (`llama` with experts), named as its transformers checkpoints name them.
MIXTRAL_BLOCK_NAMES = {
    "ffn_gate_inp": "block_sparse_moe.gate",
    "ffn_gate_exps": "block_sparse_moe.experts.*.w1",
    "ffn_up_exps": "block_sparse_moe.experts.*.w3",
    "ffn_down_exps": "block_sparse_moe.experts.*.w2",
}


_LEGACY_EXPERT_RE = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight$")
_MIXTRAL_PARTS = {"gate": "w1", "up": "w3", "down": "w2"}


def legacy_expert_name(gguf_name: str, architecture: str) -> str | None:
    """An older Mixtral file's per-expert tensor (`blk.N.ffn_gate.E.weight`) -> its
    transformers name; None for any other tensor."""
    match = _LEGACY_EXPERT_RE.match(gguf_name)
    if match is None or architecture != "llama":
        return None
    layer, part, expert = match.groups()
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{_MIXTRAL_PARTS[part]}.weight"


def expand_experts(name: str, value: Planned) -> Iterator[tuple[str, Planned]]:
    """(transformers name, tensor or reference) pairs of one converted tensor: a stacked
    experts tensor [E, ...] -> one per expert; the shared expert's gate [H] -> [1, H]; others
    as they are."""
    if isinstance(value, TensorRef):
        if ".*." in name:
            for expert, part in enumerate(split_experts(value.parts[0])):
                yield name.replace(".*.", f".{expert}."), TensorRef((part,))
        else:
            yield name, value
        return
    if ".*." in name:
        for expert in range(value.shape[0]):
            yield name.replace(".*.", f".{expert}."), value[expert].contiguous()
        return
    if name.endswith("shared_expert_gate.weight") and value.dim() == 1:
        value = value.unsqueeze(0)
    yield name, value.contiguous()


def complete_moe_config(config: dict[str, Any], reader: Any, architecture: str) -> None:
    """The expert counts and sizes transformers' GGUF mapping leaves out, in place; `llama` with
    experts becomes Mixtral. llama.cpp renormalises the chosen experts' weights for Mixtral and
    Qwen3-MoE (and wherever `expert_weights_norm` says so), not for Qwen2-MoE."""

    def field(key: str) -> Any:
        return metadata_value(reader, f"{architecture}.{key}")

    num_experts = field("expert_count")
    if not num_experts:
        return
    if config["model_type"] in ("llama", "mistral"):
        config["model_type"], config["architectures"] = "mixtral", ["MixtralForCausalLM"]
        config["num_local_experts"] = int(num_experts)
        config["num_experts_per_tok"] = int(field("expert_used_count"))
        return
    config["num_experts"], config["num_experts_per_tok"] = int(num_experts), int(field("expert_used_count"))
    for key, name in (
        ("expert_feed_forward_length", "moe_intermediate_size"),
        ("expert_shared_feed_forward_length", "shared_expert_intermediate_size"),
    ):
        if field(key) is not None:
            config[name] = int(field(key))
    norm = field("expert_weights_norm")
    config["norm_topk_prob"] = bool(norm) if norm is not None else config["model_type"] == "qwen3_moe"
