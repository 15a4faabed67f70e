"""GGUF files of the families whose Hugging Face checkpoints ship their own code (llama.cpp's
`internlm2`, `chatglm` and `minicpm` architectures) -> a Hugging Face directory in that
family's own layout.

transformers' GGUF reader does not know these architectures, so config.json is written from
the GGUF metadata here, in the family's own fields (`engine.models.remote_config` reads it back
like a downloaded checkpoint's), and the tensors are renamed to names the family's model class
loads:
- internlm2, minicpm: Llama's names (`model.layers.N.self_attn.q_proj`, ...), which both
  classes load as they are; llama.cpp's converter interleaved the rotary halves of every q / k
  head for these (as for llama), `undo_rope_permute` restores them;
- chatglm: ChatGLM's own names (`transformer.encoder.layers.N.self_attention.query_key_value`,
  ...), whose rows llama.cpp keeps in ChatGLM's layout (interleaved rotary over half of each
  head, permuted at load by `engine.models.glm`); separate `attn_q` / `attn_k` / `attn_v`
  (files converted from `GlmForCausalLM`) are concatenated into `query_key_value`.
MiniCPM's scalings come from `embedding_scale`, `residual_scale` and `logit_scale`; files
written before llama.cpp stored them carry none, and get the values llama.cpp then built in
(MiniCPM-2B's: 12, 1.4, 256). The tokenizer is transformers' generic one built from the GGUF
vocabulary (its special tokens included), as for the other architectures.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from typing import Any

import torch

from engine.models.gguf import dequantize_tensor
from engine.models.gguf_metadata import metadata_value
from engine.models.gguf_tensors import ROPE, Planned, TensorRef, dense_or_ref, write_converted

GGUF_FAMILY_ARCHITECTURES = {
    "internlm2": "InternLM2ForCausalLM",
    "chatglm": "ChatGLMModel",
    "minicpm": "MiniCPMForCausalLM",
}
_LLAMA_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LLAMA_BLOCK = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_CHATGLM_GLOBAL = {
    "token_embd": "transformer.embedding.word_embeddings",
    "output_norm": "transformer.encoder.final_layernorm",
    "output": "transformer.output_layer",
}
_CHATGLM_BLOCK = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_qkv": "self_attention.query_key_value", "attn_output": "self_attention.dense",
    "ffn_up": "mlp.dense_h_to_4h", "ffn_down": "mlp.dense_4h_to_h",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")
_MINICPM_BUILT_IN = {"embedding_scale": 12.0, "scale_depth": 1.4, "dim_model_base": 256.0}


def gguf_architecture(gguf_path: str) -> str:
    from gguf import GGUFReader

    return str(GGUFReader(gguf_path).fields["general.architecture"].contents())


def family_gguf_config(reader: Any) -> dict[str, Any]:
    """config.json content, in the family's own fields, from the GGUF metadata."""
    arch = str(metadata_value(reader, "general.architecture"))
    if any(t.name.startswith("rope_factors_") for t in reader.tensors):
        raise ValueError("GGUF models with long-context rope factors (longrope) are not supported")

    def value(key: str, default: Any = None) -> Any:
        found = metadata_value(reader, f"{arch}.{key}", default)
        if found is None:
            raise ValueError(f"the GGUF file has no {arch}.{key}")
        return found

    hidden, heads = int(value("embedding_length")), int(value("attention.head_count"))
    kv_heads = int(value("attention.head_count_kv", heads))
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    names = {t.name for t in reader.tensors}
    common = {
        "architectures": [GGUF_FAMILY_ARCHITECTURES[arch]], "model_type": arch,
        "bos_token_id": metadata_value(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata_value(reader, "tokenizer.ggml.eos_token_id"),
    }
    sizes = {
        "hidden_size": hidden, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "num_hidden_layers": int(value("block_count")), "intermediate_size": int(value("feed_forward_length")),
        "max_position_embeddings": int(value("context_length")), "vocab_size": int(embedding.shape[1]),
        "rms_norm_eps": float(value("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(value("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
    }
    if arch == "internlm2":
        return {**common, **sizes, "bias": "blk.0.attn_q.bias" in names}
    if arch == "minicpm":
        scale_emb = float(value("embedding_scale", _MINICPM_BUILT_IN["embedding_scale"]))
        layers = sizes["num_hidden_layers"]
        residual = value("residual_scale", _MINICPM_BUILT_IN["scale_depth"] / math.sqrt(layers))
        logit = value("logit_scale", hidden / _MINICPM_BUILT_IN["dim_model_base"])
        return {**common, **sizes, "scale_emb": scale_emb, "scale_depth": float(residual) * math.sqrt(layers),
                "dim_model_base": hidden / float(logit)}
    return {**common, **_chatglm_sizes(sizes, value, names)}


def _chatglm_sizes(sizes: dict[str, Any], value: Any, names: set[str]) -> dict[str, Any]:
    heads, kv_heads = sizes["num_attention_heads"], sizes["num_key_value_heads"]
    head_dim = int(value("attention.key_length", sizes["hidden_size"] // heads))
    rotary_dim = int(value("rope.dimension_count", head_dim // 2))
    if rotary_dim != head_dim // 2:
        raise ValueError(f"a ChatGLM GGUF rotating {rotary_dim} of {head_dim} dims per head is not supported (half)")
    return {
        "num_layers": sizes["num_hidden_layers"], "padded_vocab_size": sizes["vocab_size"],
        "hidden_size": sizes["hidden_size"], "ffn_hidden_size": sizes["intermediate_size"],
        "kv_channels": head_dim, "num_attention_heads": heads,
        "multi_query_attention": kv_heads < heads, "multi_query_group_num": kv_heads,
        "seq_length": sizes["max_position_embeddings"], "layernorm_epsilon": sizes["rms_norm_eps"],
        "rope_ratio": sizes["rope_theta"] / 10000.0,
        "add_qkv_bias": "blk.0.attn_qkv.bias" in names or "blk.0.attn_q.bias" in names,
        "add_bias_linear": False, "rmsnorm": True, "post_layer_norm": True,
        "apply_residual_connection_post_layernorm": False, "tie_word_embeddings": False,
    }


def _family_name(gguf_name: str, arch: str) -> str | None:
    """llama.cpp name -> the name the family's class loads (None: a separate q / k / v of chatglm)."""
    global_names, block_names = (_CHATGLM_GLOBAL, _CHATGLM_BLOCK) if arch == "chatglm" else (_LLAMA_GLOBAL, _LLAMA_BLOCK)
    match = _BLOCK_RE.match(gguf_name)
    if match:
        layer, part, kind = match.groups()
        if arch == "chatglm" and part in ("attn_q", "attn_k", "attn_v"):
            return None
        if part not in block_names:
            raise ValueError(f"unsupported GGUF tensor {gguf_name!r} for {arch}")
        prefix = "transformer.encoder.layers" if arch == "chatglm" else "model.layers"
        return f"{prefix}.{layer}.{block_names[part]}.{kind}"
    base, _, kind = gguf_name.rpartition(".")
    if base not in global_names:
        raise ValueError(f"unsupported GGUF tensor {gguf_name!r} for {arch}")
    return f"{global_names[base]}.{kind}"


def read_family_tensors(reader: Any, config: dict[str, Any]) -> Iterator[tuple[str, Planned]]:
    """(name the family's class loads, dense tensor or `TensorRef`) for every tensor of the
    file (`engine.models.gguf_tensors`: references for tensors of two or more dimensions)."""
    arch = config["model_type"]
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or config.get("multi_query_group_num") or heads)
    separate: dict[str, dict[str, Planned]] = {}  # chatglm: "layer.kind" -> attn_q / attn_k / attn_v
    for tensor in reader.tensors:
        name = _family_name(tensor.name, arch)
        relayout = None
        if name is not None and arch != "chatglm" and ".self_attn.q_proj." in name:
            relayout = (ROPE, heads)
        elif name is not None and arch != "chatglm" and ".self_attn.k_proj." in name:
            relayout = (ROPE, kv_heads)
        value = dense_or_ref(tensor, relayout, False, dequantize_tensor)
        if name is None:  # chatglm's q / k / v, fused once all three are read
            layer, part, kind = _BLOCK_RE.match(tensor.name).groups()  # type: ignore[union-attr]
            parts = separate.setdefault(f"{layer}.{kind}", {})
            parts[part] = value
            if len(parts) == 3:
                yield f"transformer.encoder.layers.{layer}.self_attention.query_key_value.{kind}", _fused_qkv(parts)
            continue
        yield name, value


def _fused_qkv(parts: dict[str, Planned]) -> Planned:
    """q | k | v rows: one reference of three parts, or (biases) one dense tensor."""
    ordered = [parts["attn_q"], parts["attn_k"], parts["attn_v"]]
    if all(isinstance(p, TensorRef) for p in ordered):
        return TensorRef(tuple(p.parts[0] for p in ordered if isinstance(p, TensorRef)))
    return torch.cat([p for p in ordered if isinstance(p, torch.Tensor)])


def convert_family_gguf(gguf_path: str, out_dir: str) -> None:
    """Write config.json, the tokenizer files and the tensors' places (`write_converted`) of
    `gguf_path` into `out_dir`."""
    from gguf import GGUFReader
    from transformers import PreTrainedTokenizerFast

    reader = GGUFReader(gguf_path)
    config = family_gguf_config(reader)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    write_converted(read_family_tensors(reader, config), out_dir, gguf_path)
    has_tokenizer = "tokenizer.ggml.model" in reader.fields
    del reader
    if has_tokenizer:
        directory, filename = os.path.split(os.path.abspath(gguf_path))
        PreTrainedTokenizerFast.from_pretrained(directory, gguf_file=filename).save_pretrained(out_dir)
