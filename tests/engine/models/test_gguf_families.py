"""GGUF round trips of the families llama.cpp defines whose Hugging Face checkpoints ship
remote code: internlm2, chatglm, minicpm.

Each file is written by the `gguf` package's own `GGUFWriter` with llama.cpp's tensor names and
metadata keys, from a family checkpoint of `remote_families` laid out as llama.cpp's converter
lays it out (q / k rows interleaved per head for internlm2 and minicpm, ChatGLM's rows as they
are), and converted to a directory the engine loads; its logits equal the family's reference.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import gguf
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from engine.models import load_model, resolve_model
from engine.tokenizer import load_tokenizer
from tests.engine.models.harness import Harness, rel_err
from tests.engine.models.remote_families import MINICPM_SCALES, save_chatglm, save_internlm2, save_minicpm

QT = gguf.GGMLQuantizationType
_LLAMA_TO_GGUF = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_CHATGLM_TO_GGUF = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attention.query_key_value": "attn_qkv", "self_attention.dense": "attn_output",
    "mlp.dense_h_to_4h": "ffn_up", "mlp.dense_4h_to_h": "ffn_down",
}
_GLOBAL_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "transformer.embedding.word_embeddings.weight": "token_embd.weight",
    "transformer.encoder.final_layernorm.weight": "output_norm.weight",
    "transformer.output_layer.weight": "output.weight",
}


def _interleave(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's converter's permutation of q / k rows (rotate_half halves -> interleaved pairs)."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _llama_cpp_tensors(path: Path, arch: str, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under llama.cpp's names and layouts."""
    out = {}
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["multi_query_group_num"]
    for name, w in load_file(str(path / "model.safetensors")).items():
        if name in _GLOBAL_TO_GGUF:
            out[_GLOBAL_TO_GGUF[name]] = w
            continue
        if "inv_freq" in name:
            continue
        parts = name.split(".")
        layer_at = parts.index("layers") + 1
        module, kind = ".".join(parts[layer_at + 1 : -1]), parts[-1]
        table = _CHATGLM_TO_GGUF if arch == "chatglm" else _LLAMA_TO_GGUF
        if arch != "chatglm" and module in ("self_attn.q_proj", "self_attn.k_proj"):
            w = _interleave(w, heads if module == "self_attn.q_proj" else kv)
        out[f"blk.{parts[layer_at]}.{table[module]}.{kind}"] = w
    return out


def _write(file: Path, arch: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any], qtype: Any = QT.F32,
           tokens: list[str] | None = None) -> None:
    writer = gguf.GGUFWriter(str(file), arch)
    writer.add_block_count(meta["layers"])
    writer.add_context_length(512)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(meta["kv"])
    writer.add_layer_norm_rms_eps(meta["eps"])
    writer.add_rope_freq_base(meta.get("theta", 10000.0))
    if "rot" in meta:
        writer.add_rope_dimension_count(meta["rot"])
        writer.add_key_length(16)
    for key, value in meta.get("scales", {}).items():
        getattr(writer, f"add_{key}")(value)
    if tokens is not None:
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores([float(-i) for i in range(len(tokens))])
        writer.add_token_types([2 if i < 3 else 1 for i in range(len(tokens))])
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
    for name, w in tensors.items():
        t = w.float().numpy()
        if t.ndim == 1 or qtype == QT.F32:
            writer.add_tensor(name, t)
        else:
            writer.add_tensor(name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _internlm2(path: Path) -> tuple[nn.Module, str, dict[str, torch.Tensor], dict[str, Any]]:
    ref = save_internlm2(path / "hf")
    # llama.cpp's converter splits wqkv into q, k, v: the reference Llama's, saved as InternLM2 reads them
    (path / "llama").mkdir()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path / "llama" / "model.safetensors"))
    config = json.loads((path / "hf" / "config.json").read_text())
    return ref, "internlm2", _llama_cpp_tensors(path / "llama", "internlm2", config), {"kv": 2, "eps": 1e-6}


def _minicpm(path: Path) -> tuple[nn.Module, str, dict[str, torch.Tensor], dict[str, Any]]:
    ref = save_minicpm(path / "hf")
    config = json.loads((path / "hf" / "config.json").read_text())
    scales = {"embedding_scale": MINICPM_SCALES["scale_emb"],
              "residual_scale": MINICPM_SCALES["scale_depth"] / math.sqrt(2),
              "logit_scale": 64 / MINICPM_SCALES["dim_model_base"]}
    return ref, "minicpm", _llama_cpp_tensors(path / "hf", "minicpm", config), {"kv": 2, "eps": 1e-6, "scales": scales}


def _chatglm(path: Path, separate_qkv: bool = False) -> tuple[nn.Module, str, dict[str, torch.Tensor], dict[str, Any]]:
    ref = save_chatglm(path / "hf", rope_parameters={"rope_type": "default", "rope_theta": 5e6, "partial_rotary_factor": 0.5})
    config = json.loads((path / "hf" / "config.json").read_text())
    tensors = _llama_cpp_tensors(path / "hf", "chatglm", config)
    if separate_qkv:  # files converted from GlmForCausalLM keep q, k, v apart
        for name in [n for n in tensors if ".attn_qkv." in n]:
            q, k, v = tensors.pop(name).split([64, 32, 32])
            for part, w in (("attn_q", q), ("attn_k", k), ("attn_v", v)):
                tensors[name.replace("attn_qkv", part)] = w
    return ref, "chatglm", tensors, {"kv": 2, "eps": 1e-5, "rot": 8, "theta": 5e6}


CASES = {
    "internlm2": _internlm2,
    "minicpm": _minicpm,
    "chatglm": _chatglm,
    "chatglm-separate-qkv": lambda path: _chatglm(path, separate_qkv=True),
}


@torch.inference_mode()
@pytest.mark.parametrize("case", sorted(CASES))
def test_family_gguf_matches_its_reference(case: str, tmp_path: Path) -> None:
    ref, arch, tensors, meta = CASES[case](tmp_path)
    file = tmp_path / f"{case}.gguf"
    _write(file, arch, tensors, {"layers": 2, **meta})
    directory = resolve_model(str(file), str(tmp_path / "cache"))
    assert json.loads(Path(directory, "config.json").read_text())["model_type"] == arch
    model = load_model(directory, torch.float32, "cpu")
    prompt = list(range(3, 60, 3))
    assert rel_err(Harness(model).prefill(0, prompt), ref(torch.tensor([prompt])).logits[0]) < 1e-4


@torch.inference_mode()
def test_quantized_family_gguf_stays_close(tmp_path: Path) -> None:
    ref, arch, tensors, meta = _chatglm(tmp_path)
    file = tmp_path / "chatglm-q8.gguf"
    _write(file, arch, tensors, {"layers": 2, **meta}, qtype=QT.Q8_0)
    model = load_model(resolve_model(str(file), str(tmp_path / "cache")), torch.float32, "cpu")
    prompt = list(range(3, 60, 3))
    assert rel_err(Harness(model).prefill(0, prompt), ref(torch.tensor([prompt])).logits[0]) < 6e-2  # Q8_0 rounding


def test_minicpm_gguf_without_scales_gets_the_built_in_ones(tmp_path: Path) -> None:
    _, arch, tensors, meta = _minicpm(tmp_path)
    file = tmp_path / "old-minicpm.gguf"
    _write(file, arch, tensors, {"layers": 2, **meta, "scales": {}})
    config = json.loads(Path(resolve_model(str(file), str(tmp_path / "cache")), "config.json").read_text())
    assert (config["scale_emb"], config["dim_model_base"]) == (12.0, 256.0)
    assert config["scale_depth"] == pytest.approx(1.4) and config["tie_word_embeddings"] is True


def test_family_gguf_tokenizer_is_converted(tmp_path: Path) -> None:
    _, arch, tensors, meta = _internlm2(tmp_path)
    pieces = ["\u2581", "t", *"0123456789", "\u2581t"]  # what merges build the words from
    tokens = ["<unk>", "<s>", "</s>", *pieces, *(f"\u2581t{i}" for i in range(256 - 3 - len(pieces)))]
    file = tmp_path / "tok.gguf"
    _write(file, arch, tensors, {"layers": 2, **meta}, tokens=tokens)
    tokenizer = load_tokenizer(resolve_model(str(file), str(tmp_path / "cache")))
    assert tokenizer is not None and tokenizer.eos_token_id == 2
    ids = tokenizer("t5 t17", add_special_tokens=False)["input_ids"]
    assert ids == [tokens.index("\u2581t5"), tokens.index("\u2581t17")]
    assert tokenizer.decode(ids) == "t5 t17"


def test_unsupported_family_tensor_is_reported(tmp_path: Path) -> None:
    _, arch, tensors, meta = _minicpm(tmp_path)
    file = tmp_path / "odd.gguf"
    _write(file, arch, {**tensors, "blk.0.ffn_gate_inp.weight": torch.zeros(4, 64)}, {"layers": 2, **meta})
    with pytest.raises(ValueError, match="unsupported GGUF tensor 'blk.0.ffn_gate_inp.weight' for minicpm"):
        resolve_model(str(file), str(tmp_path / "cache"))


def test_long_context_minicpm_gguf_is_refused(tmp_path: Path) -> None:
    _, arch, tensors, meta = _minicpm(tmp_path)
    file = tmp_path / "long.gguf"
    _write(file, arch, {**tensors, "rope_factors_long.weight": torch.ones(8)}, {"layers": 2, **meta})
    with pytest.raises(ValueError, match="longrope"):
        resolve_model(str(file), str(tmp_path / "cache"))
