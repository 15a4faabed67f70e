"""GGUF round trips of the GPT-style families (StarCoder, StarCoder2, BLOOM): files written as
llama.cpp's converter writes them, with the `gguf` package's own tensor-name map."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

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


def _add_tensor(writer: gguf.GGUFWriter, name: str, w: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> None:
    """Vectors stay F32, as llama.cpp's converter keeps them; matrices in `qtype`."""
    t = w.numpy()
    if t.ndim == 1 or qtype == QT.F32:
        writer.add_tensor(name, t)
    else:
        writer.add_tensor(name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)


def _finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


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
        _add_tensor(writer, f"{names.get_name(module)}.{kind}", w, qtype)
    _finish(writer)


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
        _add_tensor(writer, gguf_name, w, qtype)
    _finish(writer)


@torch.no_grad()
def _random_norms_and_biases(model: nn.Module) -> nn.Module:
    """transformers starts biases at 0 and LayerNorms at (1, 0): random ones check their names."""
    for param in model.parameters():
        if param.dim() == 1:
            param.add_(0.1 * torch.randn_like(param))
    return model


class Converted(NamedTuple):
    """One round trip's pieces: the transformers model the file was written from, the file, the
    directory it converted to, our model loaded from there and our prefill logits of PROMPT."""

    hf: nn.Module
    file: Path
    directory: str
    model: Any
    ours: torch.Tensor


@dataclass(frozen=True)
class RoundTrip:
    """A tiny transformers model (`kind`, `overrides`) written as a GGUF file by `write`, then
    converted and loaded here: logits within `tolerance` of the original's, and `check` passes."""

    kind: str
    overrides: dict[str, Any]
    write: Callable[[Path, nn.Module], None]
    check: Callable[[Converted], None]
    tolerance: float = 1e-4
    random_norms: bool = True  # (BLOOM's tiny model has random biases and norms already)


PROMPT = list(range(3, 60, 4))


def _logits(model: Any) -> torch.Tensor:
    return model(torch.tensor([PROMPT])).logits[0]


def _check_starcoder(c: Converted) -> None:
    """llama.cpp's `starcoder` (multi-query, learned positions, fused qkv, LayerNorm biases, tied
    head) -> GPTBigCodeForCausalLM; the converted directory loads in transformers too, with the
    file's byte-level vocabulary."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert c.model.config.multi_query and c.model.transformer.h[0].attn.attn.num_kv_heads == 1
    assert c.model.lm_head.weight is c.model.transformer.wte.weight
    reloaded = AutoModelForCausalLM.from_pretrained(dense_checkpoint(c.directory, str(c.file.parent / "dense")), dtype=torch.float32)
    assert rel_err(_logits(reloaded), _logits(c.hf)) < 1e-4
    tokenizer = AutoTokenizer.from_pretrained(c.directory)
    ids = tokenizer("def f(): pass")["input_ids"]
    assert ids[0] == 254 and len(ids) == 11  # "de" and "pa" merged
    assert tokenizer.decode(ids) == "def f(): pass" and tokenizer.eos_token_id == 2


def _check_multi_head_starcoder(c: Converted) -> None:
    """A `starcoder` file with a kv head per head: its q | k | v blocks become multi-head
    GPTBigCode's per-head rows (transformers reads the converted directory the same)."""
    from transformers import AutoModelForCausalLM

    assert not c.model.config.multi_query and c.model.transformer.h[0].attn.attn.num_kv_heads == 4
    assert c.model.lm_head.weight is not c.model.transformer.wte.weight
    reloaded = AutoModelForCausalLM.from_pretrained(dense_checkpoint(c.directory, str(c.file.parent / "dense")), dtype=torch.float32)
    assert rel_err(c.ours, _logits(reloaded)) < 1e-4


def _check_starcoder2(c: Converted) -> None:
    """llama.cpp's `starcoder2` (no q/k permutation: its rotary is rotate_half already) ->
    Starcoder2ForCausalLM, with the rotary base, vocabulary and biases transformers' mapping
    leaves out."""
    from transformers import AutoTokenizer

    tokens = _byte_level_vocab()[0]
    assert AutoTokenizer.from_pretrained(c.directory)("def")["input_ids"] == [tokens.index("de"), tokens.index("f")]
    assert c.model.config.rope_parameters["rope_theta"] == 50000.0
    assert c.model.config.use_bias == c.hf.config.use_bias and c.model.config.vocab_size == 256


def _check_bloom(c: Converted, with_output: bool) -> None:
    """BLOOM's own names and per-head q/k/v layout again; `output` kept as an untied head where
    the file has one; transformers' own GGUF reader gives the same logits."""
    from transformers import AutoModelForCausalLM

    converted = converted_tensors(c.directory)
    for name, value in c.hf.state_dict().items():
        if name in converted:
            assert torch.equal(converted[name], value), name
    assert ("lm_head.weight" in converted) == with_output
    assert c.model.tie_word_embeddings != with_output
    ref = AutoModelForCausalLM.from_pretrained(str(c.file.parent), gguf_file=c.file.name, dtype=torch.float32)
    assert rel_err(c.ours, _logits(ref)) < 1e-4


def _check_vocab_size_from_embeddings(c: Converted) -> None:
    assert c.model.config.vocab_size == c.hf.config.vocab_size


_STARCODER2 = {"rope_parameters": {"rope_type": "default", "rope_theta": 50000.0}}
_MULTI_HEAD = {"n_inner": 256, "multi_query": False, "tie_word_embeddings": False}
_BLOOM = {"num_attention_heads": 6, "hidden_size": 96}
STARCODER, STARCODER2 = gguf.MODEL_ARCH.STARCODER, gguf.MODEL_ARCH.STARCODER2
CASES = {
    "starcoder": RoundTrip("gpt_bigcode", {"n_inner": 256},
                           partial(write_starcoder_gguf, arch=STARCODER, qtype=QT.F32, with_tokenizer=True),
                           _check_starcoder),
    "starcoder-mha-F32": RoundTrip("gpt_bigcode", _MULTI_HEAD, partial(write_starcoder_gguf, arch=STARCODER, qtype=QT.F32),
                                   _check_multi_head_starcoder),
    "starcoder-mha-Q8_0": RoundTrip("gpt_bigcode", _MULTI_HEAD,
                                    partial(write_starcoder_gguf, arch=STARCODER, qtype=QT.Q8_0),
                                    _check_multi_head_starcoder, tolerance=5e-2),
    "starcoder2-bias-tied": RoundTrip("starcoder2", _STARCODER2,
                                      partial(write_starcoder_gguf, arch=STARCODER2, qtype=QT.F32, with_tokenizer=True),
                                      _check_starcoder2),
    "starcoder2-nobias-untied": RoundTrip("starcoder2", {**_STARCODER2, "use_bias": False, "tie_word_embeddings": False},
                                          partial(write_starcoder_gguf, arch=STARCODER2, qtype=QT.F32,
                                                  with_tokenizer=True),
                                          _check_starcoder2),
    "bloom-output-copy": RoundTrip("bloom", _BLOOM, partial(write_bloom_gguf, qtype=QT.F32, with_output=True),
                                   partial(_check_bloom, with_output=True), random_norms=False),
    "bloom-no-output": RoundTrip("bloom", _BLOOM, partial(write_bloom_gguf, qtype=QT.F32, with_output=False),
                                 partial(_check_bloom, with_output=False), random_norms=False),
    "bloom-Q8_0-no-vocab-size": RoundTrip("bloom", {"num_hidden_layers": 1},
                                          partial(write_bloom_gguf, qtype=QT.Q8_0, vocab_size=False),
                                          _check_vocab_size_from_embeddings, tolerance=2e-2, random_norms=False),
}


@torch.inference_mode()
@pytest.mark.parametrize("case", CASES)
def test_gguf_round_trip_matches_transformers(case: str, tmp_path: Path, cache: Path) -> None:
    """The file converts and loads; our logits equal those of the model it was written from
    (within the quantization's error), and the family's own checks pass."""
    trip = CASES[case]
    hf = save_tiny_model(str(tmp_path / "hf"), tiny_config(trip.kind, **trip.overrides))
    if trip.random_norms:
        _random_norms_and_biases(hf)
    file = tmp_path / f"tiny-{case}.gguf"
    trip.write(file, hf)
    directory = resolve_model(str(file), str(cache))
    model: Any = load_model(directory, torch.float32, "cpu")
    ours = Harness(model).prefill(0, PROMPT)
    assert rel_err(ours, _logits(hf)) < trip.tolerance
    trip.check(Converted(hf, file, directory, model, ours))


def test_starcoder_gguf_with_grouped_kv_heads_is_refused(tmp_path: Path, cache: Path) -> None:
    file = tmp_path / "grouped.gguf"
    writer = gguf.GGUFWriter(str(file), "starcoder")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)  # neither multi-query nor multi-head
    writer.add_tensor("token_embd.weight", np.zeros((256, 64), dtype=np.float32))
    _finish(writer)
    with pytest.raises(ValueError, match="GGUF starcoder with 2 kv heads"):
        resolve_model(str(file), str(cache))
    assert not cache.exists() or list(cache.iterdir()) == []
