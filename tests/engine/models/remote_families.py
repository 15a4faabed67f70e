"""Tiny checkpoints of the families without a transformers class, and their references.

InternLM2, ChatGLM2 / 3 / GLM-4 and MiniCPM 1 / 2 ship their modelling code with the
checkpoint; transformers has no class for them. Each `save_*` here writes a directory in the
family's own layout (its config.json fields, `auto_map`, tensor names and fused layouts) from
the weights of a native transformers model, through an exact conversion, and returns that
native model as the reference:
- InternLM2 from a Llama: q / k / v packed into the grouped `wqkv`, Llama's names renamed;
- ChatGLM from a `GlmForCausalLM` (the same architecture): q | k | v concatenated into
  `query_key_value`, names renamed, config fields in ChatGLM's names;
- MiniCPM: the checkpoint is random MiniCPM weights, the reference a Llama with the muP
  scalings folded into its weights (embedding x scale_emb, o_proj and down_proj x
  scale_depth / sqrt(layers), LM head / (hidden / dim_model_base)).
The `auto_map` points at a Python file that raises when imported: a load that ran remote
code would fail.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from tests.engine.models.harness import TINY_SIZES, save_tiny_model, tiny_config

_REMOTE_CODE = 'raise RuntimeError("remote code ran")\n'


def _write(path: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], module: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    config["auto_map"] = {"AutoConfig": f"{module}.Config", "AutoModelForCausalLM": f"{module}.Model"}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / f"{module}.py").write_text(_REMOTE_CODE)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))


def _random_model(config: Any, seed: int) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def save_internlm2(path: Path, seed: int = 0, **overrides: Any) -> nn.Module:
    """InternLM2 checkpoint from a Llama's weights; `attention_bias` becomes InternLM2's `bias`."""
    config = tiny_config("llama", **{**TINY_SIZES, **overrides})
    ref = _random_model(config, seed)
    heads, kv, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    tensors: dict[str, torch.Tensor] = {}
    renames = {"self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1",
               "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2",
               "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
    for i, layer in enumerate(ref.model.layers):
        prefix = f"model.layers.{i}"
        attn = layer.self_attn
        for kind in ("weight", "bias") if attn.q_proj.bias is not None else ("weight",):
            q = getattr(attn.q_proj, kind).detach().unflatten(0, (kv, heads // kv, dim))
            k = getattr(attn.k_proj, kind).detach().unflatten(0, (kv, 1, dim))
            v = getattr(attn.v_proj, kind).detach().unflatten(0, (kv, 1, dim))
            tensors[f"{prefix}.attention.wqkv.{kind}"] = torch.cat([q, k, v], dim=1).flatten(0, 2)
        for ours, theirs in renames.items():
            for kind, value in layer.get_submodule(ours).named_parameters():
                tensors[f"{prefix}.{theirs}.{kind}"] = value.detach()
    tensors["model.tok_embeddings.weight"] = ref.model.embed_tokens.weight.detach()
    tensors["model.norm.weight"] = ref.model.norm.weight.detach()
    tensors["output.weight"] = ref.lm_head.weight.detach()
    rope = dict(config.rope_parameters)
    raw = {k: getattr(config, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                                          "rms_norm_eps", "hidden_act", "bos_token_id", "eos_token_id")}
    raw.update(model_type="internlm2", architectures=["InternLM2ForCausalLM"], bias=config.attention_bias,
               rope_theta=rope.pop("rope_theta"), tie_word_embeddings=False,
               rope_scaling=None if rope["rope_type"] == "default" else rope)
    _write(path, raw, tensors, "modeling_internlm2")
    return ref


def save_internlm3(path: Path, seed: int = 0, **overrides: Any) -> nn.Module:
    """InternLM3: transformers' own config class (it builds a Llama); the checkpoint names
    its architecture `InternLM3ForCausalLM`, as the released ones do."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "InternLM3Config"):
        pytest.skip(f"transformers {transformers.__version__} has no InternLM3Config")
    config = transformers.InternLM3Config(architectures=["InternLM3ForCausalLM"], head_dim=16, **{**TINY_SIZES, **overrides})
    ref = save_tiny_model(str(path), config, seed=seed)
    saved = json.loads((path / "config.json").read_text())
    saved["architectures"] = ["InternLM3ForCausalLM"]
    saved["auto_map"] = {"AutoConfig": "configuration_internlm3.Config"}  # transformers' own class wins
    (path / "config.json").write_text(json.dumps(saved))
    (path / "configuration_internlm3.py").write_text(_REMOTE_CODE)
    return ref


def glm_config(glm4: bool = False, **overrides: Any) -> Any:
    from transformers import Glm4Config, GlmConfig

    cls, architecture = (Glm4Config, "Glm4ForCausalLM") if glm4 else (GlmConfig, "GlmForCausalLM")
    return cls(architectures=[architecture], head_dim=16, pad_token_id=0, eos_token_id=2,
               **{**TINY_SIZES, "rms_norm_eps": 1e-5, **overrides})


def save_glm(path: Path, seed: int = 0, glm4: bool = False, **overrides: Any) -> nn.Module:
    """GLM-4 in transformers' layout (`GlmForCausalLM`; `Glm4ForCausalLM` with `glm4`), saved by transformers."""
    return save_tiny_model(str(path), glm_config(glm4, **overrides), seed=seed)


def save_chatglm(path: Path, seed: int = 0, **overrides: Any) -> nn.Module:
    """ChatGLM2 / 3 / GLM-4 remote-code checkpoint from a `GlmForCausalLM`'s weights."""
    config = glm_config(**overrides)
    ref = _random_model(config, seed)
    tensors: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(ref.model.layers):
        prefix = f"transformer.encoder.layers.{i}"
        attn = layer.self_attn
        for kind in ("weight", "bias"):
            parts = [getattr(p, kind).detach() for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
            tensors[f"{prefix}.self_attention.query_key_value.{kind}"] = torch.cat(parts)
        tensors[f"{prefix}.self_attention.dense.weight"] = attn.o_proj.weight.detach()
        tensors[f"{prefix}.mlp.dense_h_to_4h.weight"] = layer.mlp.gate_up_proj.weight.detach()
        tensors[f"{prefix}.mlp.dense_4h_to_h.weight"] = layer.mlp.down_proj.weight.detach()
        tensors[f"{prefix}.input_layernorm.weight"] = layer.input_layernorm.weight.detach()
        tensors[f"{prefix}.post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight.detach()
    tensors["transformer.embedding.word_embeddings.weight"] = ref.model.embed_tokens.weight.detach()
    tensors["transformer.encoder.final_layernorm.weight"] = ref.model.norm.weight.detach()
    tensors["transformer.output_layer.weight"] = ref.lm_head.weight.detach()
    tensors["transformer.rotary_pos_emb.inv_freq"] = torch.ones(config.head_dim // 4)  # saved by ChatGLM2 / 3
    raw = {
        "model_type": "chatglm", "architectures": ["ChatGLMModel"],
        "num_layers": config.num_hidden_layers, "padded_vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "ffn_hidden_size": config.intermediate_size,
        "kv_channels": config.head_dim, "num_attention_heads": config.num_attention_heads,
        "multi_query_attention": True, "multi_query_group_num": config.num_key_value_heads,
        "seq_length": config.max_position_embeddings, "layernorm_epsilon": config.rms_norm_eps,
        "rope_ratio": config.rope_parameters["rope_theta"] / 10000.0,
        "add_qkv_bias": True, "add_bias_linear": False, "rmsnorm": True, "post_layer_norm": True,
        "apply_residual_connection_post_layernorm": False, "original_rope": True,
        "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False,
    }
    _write(path, raw, tensors, "modeling_chatglm")
    return ref


MINICPM_SCALES = {"scale_emb": 12.0, "scale_depth": 1.4, "dim_model_base": 32}


def save_minicpm(path: Path, seed: int = 0, tie_word_embeddings: bool = True, **overrides: Any) -> nn.Module:
    """MiniCPM checkpoint of random weights; the reference is a Llama with the scalings folded in."""
    sizes = {**TINY_SIZES, **overrides}
    source = _random_model(tiny_config("llama", tie_word_embeddings=tie_word_embeddings, **sizes), seed)
    tensors = {k: v.detach().clone() for k, v in source.state_dict().items()}
    if tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    raw = {k: getattr(source.config, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                 "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                                 "max_position_embeddings", "rms_norm_eps", "hidden_act",
                                                 "bos_token_id", "eos_token_id")}
    raw.update(model_type="minicpm", architectures=["MiniCPMForCausalLM"], rope_scaling=None, rope_theta=10000.0,
               tie_word_embeddings=tie_word_embeddings, **MINICPM_SCALES)
    _write(path, raw, tensors, "modeling_minicpm")

    ref = _random_model(tiny_config("llama", tie_word_embeddings=False, **sizes), seed + 1)
    residual = MINICPM_SCALES["scale_depth"] / math.sqrt(sizes["num_hidden_layers"])
    folded = dict(tensors)
    embed = tensors["model.embed_tokens.weight"]
    folded["model.embed_tokens.weight"] = embed * MINICPM_SCALES["scale_emb"]
    head = embed if tie_word_embeddings else tensors["lm_head.weight"]
    folded["lm_head.weight"] = head / (sizes["hidden_size"] / MINICPM_SCALES["dim_model_base"])
    for name, value in tensors.items():
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            folded[name] = value * residual
    ref.load_state_dict(folded)
    return ref


SAVERS = {
    "internlm2": save_internlm2,
    "internlm3": save_internlm3,
    "glm": save_glm,
    "glm4": lambda path, **overrides: save_glm(path, glm4=True, **overrides),
    "chatglm": save_chatglm,
    "minicpm": save_minicpm,
}


def save_family(kind: str, path: Path, **overrides: Any) -> nn.Module:
    """The checkpoint of family `kind` (a key of SAVERS) written to `path`; returns its reference."""
    return SAVERS[kind](path, **overrides)
