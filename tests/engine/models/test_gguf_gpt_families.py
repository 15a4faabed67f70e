"""GGUF round trips of the GPT-style families (StarCoder, StarCoder2, BLOOM): files written as
llama.cpp's converter writes them, with the `gguf` package's own tensor-name map."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from torch import nn

from engine.models import load_model, resolve_model
from tests.engine.models.harness import (
    Harness,
    converted_tensors,
    dense_checkpoint,
    rel_err,
    save_tiny_model,
    tiny_config,
)

QT = gguf.GGMLQuantizationType


# ---- StarCoder families: files as llama.cpp's converter writes them -------------------------


def _byte_level_vocab() -> tuple[list[str], list[str]]:
    """A 256-token byte-level BPE vocabulary: 254 of GPT-2's byte symbols and two merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    merges = ["d e", "p a"]
    return list(bytes_to_unicode().values())[:254] + [m.replace(" ", "") for m in merges], merges


def write_starcoder_gguf(path: Path, hf: nn.Module, arch: gguf.MODEL_ARCH, qtype: gguf.GGMLQuantizationType,
                         with_tokenizer: bool = False) -> None:
    """`hf`'s weights under llama.cpp's names (the `gguf` package's own name map), with the
    metadata llama.cpp's converter writes: `starcoder` always says one kv head and a 4x MLP, its
    `c_attn` stays as it is; `starcoder2` has the common keys and the rotary base. A multi-head
    GPTBigCode (which that converter does not describe: it always writes one kv head) is written
    with its head count and `c_attn` as q | k | v blocks, the layout llama.cpp's graph reads."""
    cfg: Any = hf.config
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_head_count(cfg.num_attention_heads)
    if arch == gguf.MODEL_ARCH.STARCODER:
        writer.add_feed_forward_length(4 * cfg.hidden_size)
        writer.add_head_count_kv(1 if cfg.multi_query else cfg.num_attention_heads)
        writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
    else:
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_head_count_kv(cfg.num_key_value_heads)
        writer.add_layer_norm_eps(cfg.norm_epsilon)
        writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    if with_tokenizer:
        tokens, merges = _byte_level_vocab()
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(tokens)
        writer.add_token_types([gguf.TokenType.NORMAL] * len(tokens))
        writer.add_token_merges(merges)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
    for name, tensor in hf.state_dict().items():
        module, _, kind = name.rpartition(".")
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # a tied head is not written
        w = tensor.detach().float()
        if ".c_attn." in name and not getattr(cfg, "multi_query", True):  # [H, (q, k, v), D] -> blocks
            w = w.reshape(cfg.num_attention_heads, 3, -1, *w.shape[1:]).transpose(0, 1).reshape(w.shape)
        t = w.numpy()
        gguf_name = f"{names.get_name(module)}.{kind}"
        if t.ndim == 1 or qtype == QT.F32:
            writer.add_tensor(gguf_name, t)
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _random_norms_and_biases(model: nn.Module) -> nn.Module:
    """transformers starts biases at 0 and LayerNorms at (1, 0): random ones check their names."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
    return model


@torch.inference_mode()
def test_starcoder_gguf_matches_transformers_gptbigcode(tmp_path: Path, cache: Path) -> None:
    """llama.cpp's `starcoder` (multi-query, learned positions, fused qkv, LayerNorm biases,
    tied head) -> GPTBigCodeForCausalLM: logits equal transformers' on the same weights, and the
    converted directory loads in transformers too."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = _random_norms_and_biases(save_tiny_model(str(tmp_path / "hf"), tiny_config("gpt_bigcode", n_inner=256)))
    file = tmp_path / "tiny-starcoder.gguf"
    write_starcoder_gguf(file, hf, gguf.MODEL_ARCH.STARCODER, QT.F32, with_tokenizer=True)
    path = resolve_model(str(file), str(cache))
    model: Any = load_model(path, torch.float32, "cpu")
    assert model.config.multi_query and model.transformer.h[0].attn.attn.num_kv_heads == 1
    assert model.lm_head.weight is model.transformer.wte.weight
    prompt = list(range(3, 40, 3))
    expected = hf(torch.tensor([prompt])).logits[0]
    assert rel_err(Harness(model).prefill(0, prompt), expected) < 1e-4
    reloaded = AutoModelForCausalLM.from_pretrained(dense_checkpoint(path, str(tmp_path / "dense")), dtype=torch.float32)
    assert rel_err(reloaded(torch.tensor([prompt])).logits[0], expected) < 1e-4
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("def f(): pass")["input_ids"]
    assert ids[0] == 254 and len(ids) == 11  # "de" and "pa" merged
    assert tokenizer.decode(ids) == "def f(): pass" and tokenizer.eos_token_id == 2


@torch.inference_mode()
@pytest.mark.parametrize("qtype", [QT.F32, QT.Q8_0], ids=lambda q: q.name)
def test_multi_head_starcoder_gguf_and_its_quantized_weights(
    qtype: gguf.GGMLQuantizationType, tmp_path: Path, cache: Path
) -> None:
    """A `starcoder` file with a kv head per head: its q | k | v blocks become multi-head
    GPTBigCode's per-head rows (transformers reads the converted directory the same)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("gpt_bigcode", n_inner=256, multi_query=False, tie_word_embeddings=False)
    hf = _random_norms_and_biases(save_tiny_model(str(tmp_path / "hf"), config))
    file = tmp_path / "tiny-starcoder-mha.gguf"
    write_starcoder_gguf(file, hf, gguf.MODEL_ARCH.STARCODER, qtype)
    path = resolve_model(str(file), str(cache))
    model: Any = load_model(path, torch.float32, "cpu")
    assert not model.config.multi_query and model.transformer.h[0].attn.attn.num_kv_heads == 4
    assert model.lm_head.weight is not model.transformer.wte.weight
    prompt = list(range(3, 40, 3))
    ours = Harness(model).prefill(0, prompt)
    reloaded = AutoModelForCausalLM.from_pretrained(dense_checkpoint(path, str(tmp_path / "dense")), dtype=torch.float32)
    assert rel_err(ours, reloaded(torch.tensor([prompt])).logits[0]) < 1e-4
    assert rel_err(ours, hf(torch.tensor([prompt])).logits[0]) < (1e-4 if qtype == QT.F32 else 5e-2)


@torch.inference_mode()
@pytest.mark.parametrize("overrides", [{}, {"use_bias": False, "tie_word_embeddings": False}],
                         ids=["bias-tied", "nobias-untied"])
def test_starcoder2_gguf_matches_transformers(overrides: dict[str, Any], tmp_path: Path, cache: Path) -> None:
    """llama.cpp's `starcoder2` (no q/k permutation: its rotary is rotate_half already) ->
    Starcoder2ForCausalLM, with the rotary base, vocabulary and biases transformers' mapping
    leaves out."""
    from transformers import AutoTokenizer

    config = tiny_config("starcoder2", rope_parameters={"rope_type": "default", "rope_theta": 50000.0}, **overrides)
    hf = _random_norms_and_biases(save_tiny_model(str(tmp_path / "hf"), config))
    file = tmp_path / "tiny-starcoder2.gguf"
    write_starcoder_gguf(file, hf, gguf.MODEL_ARCH.STARCODER2, QT.F32, with_tokenizer=True)
    path = resolve_model(str(file), str(cache))
    model: Any = load_model(path, torch.float32, "cpu")
    tokens = _byte_level_vocab()[0]
    assert AutoTokenizer.from_pretrained(path)("def")["input_ids"] == [tokens.index("de"), tokens.index("f")]
    assert model.config.rope_parameters["rope_theta"] == 50000.0
    assert model.config.use_bias == config.use_bias and model.config.vocab_size == 256
    prompt = list(range(3, 40, 3))
    assert rel_err(Harness(model).prefill(0, prompt), hf(torch.tensor([prompt])).logits[0]) < 1e-4


def test_starcoder_gguf_with_grouped_kv_heads_is_refused(tmp_path: Path, cache: Path) -> None:
    file = tmp_path / "grouped.gguf"
    writer = gguf.GGUFWriter(str(file), "starcoder")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)  # neither multi-query nor multi-head
    writer.add_tensor("token_embd.weight", np.zeros((256, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="GGUF starcoder with 2 kv heads"):
        resolve_model(str(file), str(cache))
    assert not cache.exists() or list(cache.iterdir()) == []


def write_bloom_gguf(
    path: Path, hf: nn.Module, qtype: gguf.GGMLQuantizationType, with_output: bool = True, vocab_size: bool = True
) -> None:
    """A `bloom` GGUF of `hf`'s weights as llama.cpp's converter writes one: names from the
    `gguf` package's own map (after dropping `transformer.`), the fused q/k/v reordered from
    BLOOM's per-head rows to q | k | v, and (`with_output`) a copy of the embeddings as
    `output` where the checkpoint has no LM head. Without `vocab_size` the metadata leaves
    the vocabulary's size to the embeddings' shape."""
    cfg: Any = hf.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BLOOM, cfg.n_layer)
    writer = gguf.GGUFWriter(str(path), "bloom")
    writer.add_context_length(2048)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(4 * cfg.hidden_size)
    writer.add_block_count(cfg.n_layer)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_head)
    writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
    if vocab_size:
        writer.add_vocab_size(cfg.vocab_size)
    tensors = {k.removeprefix("transformer."): v.detach().float() for k, v in hf.state_dict().items()}
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
        if with_output:
            tensors["lm_head.weight"] = tensors["word_embeddings.weight"]
    for name, w in tensors.items():
        if ".query_key_value." in name:  # [H, 3, D] rows -> q | k | v
            rest = w.shape[1:]
            w = w.reshape(cfg.n_head, 3, -1, *rest).transpose(0, 1).reshape(w.shape)
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, name
        t = w.numpy()
        if t.ndim == 1 or qtype == QT.F32:
            writer.add_tensor(gguf_name, t)
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("with_output", [True, False], ids=["output-copy", "no-output"])
@torch.inference_mode()
def test_bloom_gguf_matches_original_and_transformers_gguf(with_output: bool, tmp_path: Path, cache: Path) -> None:
    from transformers import AutoModelForCausalLM

    hf = save_tiny_model(str(tmp_path / "hf"), tiny_config("bloom", num_attention_heads=6, hidden_size=96))
    file = tmp_path / "tiny-bloom.gguf"
    write_bloom_gguf(file, hf, QT.F32, with_output)
    directory = resolve_model(str(file), str(cache))
    converted = converted_tensors(directory)
    for name, value in hf.state_dict().items():  # BLOOM's own names and per-head q/k/v layout again
        if name in converted:
            assert torch.equal(converted[name], value), name
    assert ("lm_head.weight" in converted) == with_output
    model: Any = load_model(directory, torch.float32, "cpu")
    assert model.tie_word_embeddings != with_output
    prompt = list(range(3, 60, 4))
    ours = Harness(model).prefill(0, prompt)
    assert rel_err(ours, hf(torch.tensor([prompt])).logits[0]) < 1e-4
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=file.name, dtype=torch.float32)
    assert rel_err(ours, ref(torch.tensor([prompt])).logits[0]) < 1e-4


def test_bloom_gguf_quantized_without_vocab_size_stays_close(tmp_path: Path, cache: Path) -> None:
    hf = save_tiny_model(str(tmp_path / "hf"), tiny_config("bloom", num_hidden_layers=1))
    file = tmp_path / "tiny-bloom-q8.gguf"
    write_bloom_gguf(file, hf, QT.Q8_0, vocab_size=False)
    model = load_model(resolve_model(str(file), str(cache)), torch.float32, "cpu")
    prompt = list(range(3, 60, 4))
    with torch.inference_mode():
        expected = hf(torch.tensor([prompt])).logits[0]
    assert rel_err(Harness(model).prefill(0, prompt), expected) < 2e-2
