"""GGUF file -> Hugging Face directory (config.json, tokenizer files, and where each tensor is).

The conversion runs once per file (the loader caches its output, `engine.models.gguf_cache`).
Tensors keep their transformers names (`model.layers.N.self_attn.q_proj.weight` for llama.cpp's
`blk.N.attn_q.weight`) but stay in the GGUF file: the directory records each one's offset, type
and row re-layout (`engine.models.gguf_tensors`), and the loader dequantizes them lazily, or
serves their blocks as they are (`engine.models.gguf_source`, `engine.layers.gguf_linear`).
Only one-dimensional tensors (norms, biases) are dequantized here, into `model.safetensors`
(`gguf.quants.dequantize`: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and whatever else the
installed `gguf` package can dequantize). For the `llama` architecture the q/k rows are
un-permuted: llama.cpp's converter interleaves the two rotary halves of every head,
`undo_rope_permute` restores the `rotate_half` layout (`deepseek2`: engine/models/gguf_deepseek.py).
For `bloom` the names are BLOOM's (`transformer.h.N.self_attention.query_key_value`), and the
fused q/k/v goes back from llama.cpp's q | k | v rows to BLOOM's per-head [H, 3, D] rows, so
the directory loads as an ordinary BLOOM checkpoint.
Config and tokenizer come from transformers' own GGUF metadata readers, completed where its
mapping leaves something out; the config of the architectures it lacks or misreads comes from
`engine/models/gguf_metadata.py` or, for `starcoder`, is written from the metadata here
(`OWN_CONFIG_READERS`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from engine.kernels.gguf_cpu import SUPPORTED_TYPES
from engine.models.gguf_deepseek import DEEPSEEK2_BLOCK_NAMES, deepseek2_config, merge_kv_b
from engine.models.gguf_moe import (
    MIXTRAL_BLOCK_NAMES,
    MOE_BLOCK_NAMES,
    complete_moe_config,
    expand_experts,
    legacy_expert_name,
)
from engine.models.gguf_tensors import (
    QKV_HEADS,
    ROPE,
    Planned,
    dense_or_ref,
    write_converted,
)
from engine.models.gguf_tensors import undo_rope_permute as undo_rope_permute  # re-exported

# general.architecture -> transformers class
GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "stablelm": "StableLmForCausalLM",
    "command-r": "CohereForCausalLM",
    "cohere2": "Cohere2ForCausalLM",
    "gpt_bigcode": "GPTBigCodeForCausalLM",  # llama.cpp's `starcoder`
    "starcoder2": "Starcoder2ForCausalLM",
    "bloom": "BloomForCausalLM",
}

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_qkv": "self_attn.qkv_proj",  # phi3: fused as in its transformers checkpoints
    "attn_q_norm": "self_attn.q_norm",  # qwen3
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    **MOE_BLOCK_NAMES,  # qwen2moe, qwen3moe
}
# Per architecture, where a llama.cpp name means something else (phi3's ffn_up is gate | up).
_ARCH_BLOCK_NAMES = {
    "phi3": {"ffn_up": "mlp.gate_up_proj"},
    "llama": MIXTRAL_BLOCK_NAMES,
    "deepseek2": DEEPSEEK2_BLOCK_NAMES,
    "starcoder2": {"ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"},
    "starcoder": {
        "attn_norm": "ln_1",
        "attn_qkv": "attn.c_attn",
        "attn_output": "attn.c_proj",
        "ffn_norm": "ln_2",
        "ffn_up": "mlp.c_fc",
        "ffn_down": "mlp.c_proj",
    },
    "bloom": {
        "attn_qkv": "self_attention.query_key_value",
        "attn_output": "self_attention.dense",
        "ffn_up": "mlp.dense_h_to_4h",
        "ffn_down": "mlp.dense_4h_to_h",
    },
}
# Per architecture, transformers' names of the blocks and of the tensors outside them, where
# they are not Llama's (GPTBigCode's `transformer.h.N`, its position table `wpe`).
_ARCH_LAYER_PREFIX = {"starcoder": "transformer.h", "bloom": "transformer.h"}
_ARCH_GLOBAL_NAMES = {
    "starcoder": {
        "token_embd": "transformer.wte",
        "position_embd": "transformer.wpe",
        "output_norm": "transformer.ln_f",
        "output": "lm_head",
    },
    "bloom": {
        "token_embd": "transformer.word_embeddings",
        "token_embd_norm": "transformer.word_embeddings_layernorm",
        "output_norm": "transformer.ln_f",
        "output": "lm_head",
    },
}
# AutoTokenizer reads the model's config through transformers' GGUF reader first, which fails
# on these (`gguf_metadata`); their tokenizer is built from the file's tokenizer fields alone.
_TOKENIZER_ONLY_FROM_FILE = {"cohere", "cohere2", "deepseek_v2"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")
# Tensors with no transformers counterpart (llama3's precomputed rope factors come from config).
_SKIPPED = {"rope_freqs.weight"}


def hf_tensor_name(gguf_name: str, architecture: str = "llama") -> str | None:
    """llama.cpp tensor name -> transformers name (None for tensors that are not loaded)."""
    if gguf_name in _SKIPPED:
        return None
    legacy = legacy_expert_name(gguf_name, architecture)
    if legacy is not None:
        return legacy
    match = _BLOCK_RE.match(gguf_name)
    if match:
        layer, part, kind = match.groups()
        names = {**_BLOCK_NAMES, **_ARCH_BLOCK_NAMES.get(architecture, {})}
        if part not in names:
            raise ValueError(f"unsupported GGUF tensor {gguf_name!r}")
        return f"{_ARCH_LAYER_PREFIX.get(architecture, 'model.layers')}.{layer}.{names[part]}.{kind}"
    base, _, kind = gguf_name.rpartition(".")
    global_names = _ARCH_GLOBAL_NAMES.get(architecture, _GLOBAL_NAMES)
    if base not in global_names:
        raise ValueError(f"unsupported GGUF tensor {gguf_name!r}")
    return f"{global_names[base]}.{kind}"


def dequantize_tensor(tensor: Any) -> torch.Tensor:
    """A `gguf.ReaderTensor` -> torch tensor in transformers' [rows, cols] order.

    F16 and BF16 keep their dtype; everything else becomes float32.
    """
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    shape = tuple(int(n) for n in reversed(tensor.shape))  # ggml lists the fastest dim first
    qtype = tensor.tensor_type
    if qtype == GGMLQuantizationType.F16:
        return torch.from_numpy(np.array(tensor.data, dtype=np.float16).reshape(shape))
    if qtype == GGMLQuantizationType.BF16:
        raw = np.array(tensor.data).view(np.int16).reshape(shape)
        return torch.from_numpy(raw).view(torch.bfloat16)
    try:
        data = dequantize(tensor.data, qtype)
    except NotImplementedError as e:
        raise ValueError(f"GGUF tensor {tensor.name!r}: quantization {qtype.name} is not supported") from e
    return torch.from_numpy(np.array(data, dtype=np.float32).reshape(shape))  # a writable copy


def read_gguf_tensors(reader: Any, config: dict[str, Any]) -> Iterator[tuple[str, Planned]]:
    """Yield (transformers name, dense tensor or `TensorRef`) for every tensor of an opened
    `gguf.GGUFReader` (`engine.models.gguf_tensors`); a 2-D tensor the CPU kernels take is
    marked to be served in its blocks (not for `deepseek2`, whose kv_b is joined)."""
    architecture = _read_str(reader, "general.architecture")
    num_heads = _num_heads(config)
    num_kv_heads = int(config.get("num_key_value_heads") or num_heads)
    planned = _read_tensors(reader, architecture, num_heads, num_kv_heads)
    yield from merge_kv_b(planned) if architecture == "deepseek2" else planned


def _read_tensors(reader: Any, architecture: str, num_heads: int, num_kv_heads: int) -> Iterator[tuple[str, Planned]]:
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name, architecture)
        if name is None:
            continue
        relayout = _relayout_of(name, architecture, num_heads, num_kv_heads)
        blocks = architecture != "deepseek2" and len(tensor.shape) == 2 and int(tensor.tensor_type) in SUPPORTED_TYPES
        yield from expand_experts(name, dense_or_ref(tensor, relayout, blocks, dequantize_tensor))


def _relayout_of(name: str, architecture: str, num_heads: int, num_kv_heads: int) -> tuple[str, int] | None:
    """How the rows of `name` go from llama.cpp's order to transformers' (module docstring)."""
    if (architecture == "starcoder" and ".c_attn." in name and num_kv_heads == num_heads) or (
        architecture == "bloom" and ".query_key_value." in name
    ):
        return QKV_HEADS, num_heads
    if architecture == "llama" and (".self_attn.q_proj." in name or ".self_attn.k_proj." in name):
        return ROPE, num_heads if ".q_proj." in name else num_kv_heads
    return None


def _num_heads(config: dict[str, Any]) -> int:
    return int(config.get("num_attention_heads") or config["n_head"])  # BLOOM's config says n_head


def _read_str(reader: Any, key: str) -> str:
    field = reader.fields[key]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def _read_number(reader: Any, key: str) -> float | None:
    field = reader.fields.get(key)
    return None if field is None else float(field.parts[field.data[0]][0])


def _read_int(reader: Any, key: str) -> int | None:
    value = _read_number(reader, key)
    return None if value is None else int(value)


def gguf_config(gguf_path: str, reader: Any) -> dict[str, Any]:
    """config.json content (a dict) from the GGUF metadata, with `architectures` filled in;
    `reader`: the file opened by `gguf.GGUFReader`, for what transformers' mapping leaves out."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from engine.models.gguf_metadata import METADATA_CONFIGS

    architecture = _read_str(reader, "general.architecture")
    if architecture in METADATA_CONFIGS:  # transformers' reader lacks these (see gguf_metadata)
        config = METADATA_CONFIGS[architecture](reader)
        config["architectures"] = [GGUF_ARCHITECTURES[architecture]]
        return config
    if architecture in OWN_CONFIG_READERS:  # transformers' GGUF reader has no mapping for it
        return OWN_CONFIG_READERS[architecture](reader)
    config = dict(load_gguf_checkpoint(gguf_path, return_tensors=False)["config"])
    config.pop("_model_name_or_path", None)
    model_type = config.get("model_type")
    if model_type not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {model_type!r} is not supported; supported: {', '.join(sorted(GGUF_ARCHITECTURES))}"
        )
    config["architectures"] = [GGUF_ARCHITECTURES[model_type]]
    if any(t.name.startswith("rope_factors_") for t in reader.tensors):  # phi3's long-context variants
        raise ValueError("GGUF models with long-context rope factors (longrope) are not supported")

    def number(key: str) -> int | None:
        return _read_int(reader, f"{architecture}.{key}")  # keys by llama.cpp's name (mistral's are llama.*)

    head_dim = number("attention.key_length")
    if head_dim is not None:  # a head size that is not hidden / heads (Qwen3's 128 with 1 024 / 16)
        config["head_dim"] = head_dim
    head_dim = head_dim or config["hidden_size"] // _num_heads(config)
    sliding_window = number("attention.sliding_window")
    if sliding_window:
        config["sliding_window"] = sliding_window
    rotary_dim = number("rope.dimension_count")
    if rotary_dim and rotary_dim < head_dim:  # a partial rotation (transformers' mapping drops it)
        config["partial_rotary_factor"] = rotary_dim / head_dim
    if architecture == "starcoder2":
        _complete_starcoder2_config(config, reader)
    if architecture == "bloom":
        _complete_bloom_config(config, reader)
    complete_moe_config(config, reader, architecture)
    return config


def convert_gguf(gguf_path: str, out_dir: str) -> None:
    """Write config.json, the tokenizer files, the norms (`model.safetensors`) and where every
    other tensor lies in `gguf_path` (`gguf-tensors.json`) into `out_dir`."""
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast

    reader = GGUFReader(gguf_path)
    config_dict = gguf_config(gguf_path, reader)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    config.save_pretrained(out_dir)

    has_tokenizer = "tokenizer.ggml.model" in reader.fields
    # Where transformers cannot read the file's config, AutoTokenizer is told the tokenizer's
    # model type (it would read that config first to find it).
    tokenizer_type = model_type if _read_str(reader, "general.architecture") in OWN_CONFIG_READERS else None
    tied = bool(config_dict.get("tie_word_embeddings"))
    write_converted(read_gguf_tensors(reader, config_dict), out_dir, gguf_path, tied=tied)
    del reader

    if has_tokenizer:
        directory, filename = os.path.split(os.path.abspath(gguf_path))
        if model_type in _TOKENIZER_ONLY_FROM_FILE:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(directory, gguf_file=filename)
        else:
            tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename, tokenizer_type=tokenizer_type)
        tokenizer.save_pretrained(out_dir)


# ---- StarCoder families ---------------------------------------------------------------------


def _tensor_rows(reader: Any, name: str) -> int | None:
    """Rows of a 2-D tensor in transformers' order (ggml lists the fastest dim first)."""
    return next((int(t.shape[-1]) for t in reader.tensors if t.name == name), None)


def _tokenizer_ids(reader: Any) -> dict[str, int]:
    ids = {}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = _read_int(reader, f"tokenizer.ggml.{name.replace('pad_', 'padding_')}")
        if value is not None:
            ids[name] = value
    return ids


def starcoder_config(reader: Any) -> dict[str, Any]:
    """A GPTBigCode config from llama.cpp's `starcoder` metadata. llama.cpp writes one kv head
    (multi-query) and `c_attn` as q | k | v blocks; a file with a kv head per head is read as
    multi-head (its blocks re-laid per head by `read_gguf_tensors`)."""

    def number(key: str) -> int | None:
        return _read_int(reader, f"starcoder.{key}")

    def required(key: str) -> int:
        value = number(key)
        if value is None:
            raise ValueError(f"GGUF starcoder file without starcoder.{key}")
        return value

    num_heads = required("attention.head_count")
    num_kv_heads = number("attention.head_count_kv") or 1
    if num_kv_heads not in (1, num_heads):
        raise ValueError(f"GGUF starcoder with {num_kv_heads} kv heads: GPTBigCode has one, or one per head")
    eps = _read_number(reader, "starcoder.attention.layer_norm_epsilon")
    return {
        "model_type": "gpt_bigcode",
        "architectures": [GGUF_ARCHITECTURES["gpt_bigcode"]],
        "hidden_size": required("embedding_length"),
        "num_hidden_layers": required("block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "multi_query": num_kv_heads == 1,
        "max_position_embeddings": required("context_length"),
        "n_inner": number("feed_forward_length"),
        "layer_norm_epsilon": 1e-5 if eps is None else eps,
        "activation_function": "gelu_pytorch_tanh",  # llama.cpp's GELU: the tanh approximation
        "vocab_size": number("vocab_size") or _tensor_rows(reader, "token_embd.weight"),
        "tie_word_embeddings": all(t.name != "output.weight" for t in reader.tensors),
        **_tokenizer_ids(reader),
    }


# llama.cpp architecture -> its config from the GGUF metadata, where transformers has no mapping
OWN_CONFIG_READERS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "starcoder": starcoder_config,
    "deepseek2": deepseek2_config,
}


def _complete_starcoder2_config(config: dict[str, Any], reader: Any) -> None:
    """What transformers' mapping of `starcoder2` leaves out: the rotary base, the vocabulary
    size and whether the projections have biases (read from the tensors)."""
    theta = _read_number(reader, "starcoder2.rope.freq_base")
    if theta is not None:
        config["rope_theta"] = theta
    if "vocab_size" not in config:
        config["vocab_size"] = _read_int(reader, "starcoder2.vocab_size") or _tensor_rows(reader, "token_embd.weight")
    config["use_bias"] = any(t.name.endswith(".attn_q.bias") for t in reader.tensors)


# ---- BLOOM -----------------------------------------------------------------------------------


def _complete_bloom_config(config: dict[str, Any], reader: Any) -> None:
    """transformers ties BLOOM's head whatever the file holds; llama.cpp uses the file's
    `output` where there is one (its converter writes a copy of the embeddings there). Without
    `bloom.vocab_size` transformers guesses the vocabulary from the tokenizer, which BLOOM's
    padded embeddings outnumber: the embeddings' rows say."""
    config["tie_word_embeddings"] = all(t.name != "output.weight" for t in reader.tensors)
    if _read_int(reader, "bloom.vocab_size") is None:
        config["vocab_size"] = _tensor_rows(reader, "token_embd.weight") or config.get("vocab_size")
