"""GGUF -> HF conversion: names, dequantization per quant type, llama.cpp's q/k permutation, cache."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from torch import nn

from engine.models import gguf as gguf_convert
from engine.models import load_model, resolve_model
from engine.models.gguf import hf_tensor_name, undo_rope_permute
from tests.engine.models.harness import Harness, converted_tensors, rel_err, save_tiny_model, tiny_config

QT = gguf.GGMLQuantizationType
QUANT_TYPES = [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1]
_HF_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.qkv_proj": "attn_qkv",  # phi3
    "mlp.gate_up_proj": "ffn_up",  # phi3: gate | up in one tensor
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf_name: str) -> str:
    if hf_name.startswith("model.layers."):
        _, _, layer, rest = hf_name.split(".", 3)
        module, kind = rest.rsplit(".", 1)
        return f"blk.{layer}.{_HF_TO_GGUF[module]}.{kind}"
    return {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }[hf_name]


def _rope_permute(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """What llama.cpp's converter does to q/k rows (the inverse of undo_rope_permute)."""
    return (
        w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
    )


def write_gguf(path: Path, hf: nn.Module, qtype: gguf.GGMLQuantizationType, arch: str = "llama",
               extra: dict[str, np.ndarray] | None = None, name: str | None = None) -> None:
    """A GGUF file of `hf`'s weights: 2-D weights in `qtype`, norms in F32 (as llama.cpp); q/k
    rows permuted as llama.cpp's converter does for `llama` only."""
    cfg: Any = hf.config
    writer = gguf.GGUFWriter(str(path), arch)
    if name is not None:
        writer.add_name(name)
    if getattr(cfg, "head_dim", None):
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    if getattr(cfg, "sliding_window", None):
        writer.add_sliding_window(cfg.sliding_window)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_rope_dimension_count(int(head_dim * (cfg.rope_parameters or {}).get("partial_rotary_factor", 1.0)))
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    for name, tensor in hf.state_dict().items():
        w = tensor.detach().float()
        if arch == "llama" and ".q_proj." in name:
            w = _rope_permute(w, cfg.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            w = _rope_permute(w, cfg.num_key_value_heads)
        t = w.numpy()
        if t.ndim == 1 or qtype == QT.F32:
            writer.add_tensor(_gguf_name(name), t)
        else:
            writer.add_tensor(_gguf_name(name), gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    for name, array in (extra or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> nn.Module:
    cfg = tiny_config("llama", num_hidden_layers=1, tie_word_embeddings=False)
    return save_tiny_model(str(tmp_path_factory.mktemp("hf")), cfg)


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda q: q.name)
def test_converted_tensors_equal_gguf_dequantize(
    qtype: gguf.GGMLQuantizationType, tiny_hf: nn.Module, tmp_path: Path, cache: Path
) -> None:
    file = tmp_path / f"tiny-{qtype.name}.gguf"
    write_gguf(file, tiny_hf, qtype)
    converted = converted_tensors(resolve_model(str(file), str(cache)))
    cfg: Any = tiny_hf.config
    reader = gguf.GGUFReader(str(file))
    assert len(converted) == len(reader.tensors)
    for tensor in reader.tensors:
        shape = tuple(int(n) for n in reversed(tensor.shape))
        expected = torch.from_numpy(
            np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type))
        ).reshape(shape)
        name = hf_tensor_name(tensor.name)
        assert name is not None
        if ".q_proj." in name:
            expected = undo_rope_permute(expected, cfg.num_attention_heads)
        elif ".k_proj." in name:
            expected = undo_rope_permute(expected, cfg.num_key_value_heads)
        torch.testing.assert_close(converted[name].float(), expected.float(), rtol=0, atol=0)
        # Up to quantization error, the original (un-permuted) HF weight comes back.
        assert rel_err(converted[name], tiny_hf.state_dict()[name]) < 0.15


@torch.inference_mode()
def test_f32_gguf_model_matches_original_and_transformers_gguf(
    tiny_hf: nn.Module, tmp_path: Path, cache: Path
) -> None:
    from transformers import AutoModelForCausalLM

    file = tmp_path / "tiny.gguf"
    write_gguf(file, tiny_hf, QT.F32)
    model = load_model(resolve_model(str(file), str(cache)), torch.float32, "cpu")
    prompt = list(range(3, 40, 3))
    ours = Harness(model).prefill(0, prompt)
    assert rel_err(ours, tiny_hf(torch.tensor([prompt])).logits[0]) < 1e-4
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=file.name, dtype=torch.float32)
    assert rel_err(ours, ref(torch.tensor([prompt])).logits[0]) < 1e-4


@torch.inference_mode()
def test_qwen3_gguf_keeps_its_head_size_and_qk_norms(tmp_path: Path, cache: Path) -> None:
    hf = save_tiny_model(str(tmp_path / "hf"), tiny_config("qwen3", num_hidden_layers=1, tie_word_embeddings=False))
    file = tmp_path / "tiny-qwen3.gguf"
    write_gguf(file, hf, QT.F32, arch="qwen3")
    model = load_model(resolve_model(str(file), str(cache)), torch.float32, "cpu")
    assert model.config.head_dim == 32 != model.config.hidden_size // model.config.num_attention_heads
    prompt = list(range(3, 40, 3))
    assert rel_err(Harness(model).prefill(0, prompt), hf(torch.tensor([prompt])).logits[0]) < 1e-4


@torch.inference_mode()
def test_phi3_gguf_keeps_fused_tensors_sliding_window_and_partial_rotation(tmp_path: Path, cache: Path) -> None:
    config = tiny_config("phi3", num_hidden_layers=1, sliding_window=6, partial_rotary_factor=0.5)
    hf = save_tiny_model(str(tmp_path / "hf"), config)
    file = tmp_path / "tiny-phi3.gguf"
    write_gguf(file, hf, QT.F32, arch="phi3")
    model: Any = load_model(resolve_model(str(file), str(cache)), torch.float32, "cpu")
    attn = model.model.layers[0].self_attn
    assert attn.attn.sliding_window == 6 and attn.rotary_emb.rotary_dim == 8
    prompt = list(range(3, 40, 3))  # 13 tokens: past the window
    assert rel_err(Harness(model).prefill(0, prompt), hf(torch.tensor([prompt])).logits[0]) < 1e-4


@torch.inference_mode()
def test_mistral_in_a_llama_gguf_keeps_its_sliding_window(tmp_path: Path, cache: Path) -> None:
    """A `llama` file that transformers reads as `mistral` (by its name): the metadata keys are
    still `llama.*`, so the sliding window is read from there."""
    hf = save_tiny_model(str(tmp_path / "hf"), tiny_config("mistral", num_hidden_layers=1, sliding_window=6))
    file = tmp_path / "tiny-mistral.gguf"
    write_gguf(file, hf, QT.F32, arch="llama", name="mistral")
    model: Any = load_model(resolve_model(str(file), str(cache)), torch.float32, "cpu")
    assert model.config.model_type == "mistral" and model.model.layers[0].self_attn.attn.sliding_window == 6
    prompt = list(range(3, 40, 3))  # 13 tokens: past the window
    assert rel_err(Harness(model).prefill(0, prompt), hf(torch.tensor([prompt])).logits[0]) < 1e-4


def test_long_context_phi3_gguf_is_refused(tmp_path: Path, cache: Path) -> None:
    hf = save_tiny_model(str(tmp_path / "hf"), tiny_config("phi3", num_hidden_layers=1))
    file = tmp_path / "long.gguf"
    writer_tensors = {"rope_factors_long.weight": np.ones(8, dtype=np.float32)}
    write_gguf(file, hf, QT.F32, arch="phi3", extra=writer_tensors)
    with pytest.raises(ValueError, match="longrope"):
        resolve_model(str(file), str(cache))


def test_conversion_is_cached_and_keyed_by_content(
    tiny_hf: nn.Module, tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = tmp_path / "tiny.gguf"
    write_gguf(file, tiny_hf, QT.Q8_0)
    first = resolve_model(str(file), str(cache))
    assert Path(first).parent == cache

    def fail(*args: object) -> None:
        raise AssertionError("converted twice")

    monkeypatch.setattr(gguf_convert, "convert_gguf", fail)
    assert resolve_model(str(file), str(cache)) == first
    os.utime(file, ns=(1, 1))  # touched, not changed: the same entry
    assert resolve_model(str(file), str(cache)) == first
    with open(file, "r+b") as f:  # a changed weight byte is a new cache entry
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(AssertionError, match="converted twice"):
        resolve_model(str(file), str(cache))


def test_crash_during_conversion_leaves_no_cache_entry(
    tiny_hf: nn.Module, tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = tmp_path / "tiny.gguf"
    write_gguf(file, tiny_hf, QT.F16)
    real = gguf_convert.convert_gguf

    def crash(gguf_path: str, out_dir: str) -> None:
        real(gguf_path, out_dir)  # everything written, then the process "dies" before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_convert, "convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(str(file), str(cache))
    assert list(cache.iterdir()) == []
    monkeypatch.setattr(gguf_convert, "convert_gguf", real)
    assert os.path.isfile(os.path.join(resolve_model(str(file), str(cache)), "model.safetensors"))


def test_unsupported_tensor_name_is_reported() -> None:
    with pytest.raises(ValueError, match="unsupported GGUF tensor"):
        hf_tensor_name("blk.0.ssm_conv1d.weight")


def write_llama_cpp_gguf(path: Path, hf: nn.Module, arch: str, tokenizer: bool = False) -> None:
    """`hf`'s weights (F32) and metadata as llama.cpp's converter writes them for `stablelm`,
    `command-r` and `cohere2`: q/k rows as they are (no permutation), StableLM's per-head
    norms stacked into one [heads, head_dim] tensor, the sliding-window pattern of Cohere2 left
    implicit (llama.cpp's every fourth layer global)."""
    cfg: Any = hf.config
    writer = gguf.GGUFWriter(str(path), arch)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_eps(cfg.layer_norm_eps)
    rope = cfg.rope_parameters
    if arch == "stablelm":
        writer.add_rope_dimension_count(int(head_dim * rope["partial_rotary_factor"]))
        writer.add_parallel_residual(cfg.use_parallel_residual)
        writer.add_vocab_size(cfg.vocab_size)  # transformers' reader needs it without a tokenizer
    else:
        writer.add_rope_freq_base(rope["rope_theta"])
        writer.add_logit_scale(cfg.logit_scale)
    if arch == "cohere2":
        writer.add_sliding_window(cfg.sliding_window)
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_rope_dimension_count(head_dim)
    if tokenizer:
        _add_byte_level_tokenizer(writer)
    for name, tensor in _stacked_head_norms(hf.state_dict()).items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # not in a tied checkpoint, so not in its GGUF either
        if name == "model.norm.bias":
            writer.add_tensor("output_norm.bias", tensor.float().numpy())
        else:
            writer.add_tensor(_gguf_name(name), tensor.detach().float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _stacked_head_norms(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """StableLM's `q_layernorm.norms.{head}.weight` -> one `q_norm.weight` [heads, head_dim]."""
    out: dict[str, torch.Tensor] = {}
    heads: dict[str, list[torch.Tensor]] = {}
    for name, tensor in state.items():
        if "_layernorm.norms." in name:
            prefix = name.split("_layernorm.norms.")[0]  # ....self_attn.q
            heads.setdefault(f"{prefix}_norm.weight", []).append(tensor)  # heads in order 0, 1, ...
        else:
            out[name] = tensor
    return {**out, **{name: torch.stack(rows) for name, rows in heads.items()}}


def _add_byte_level_tokenizer(writer: gguf.GGUFWriter) -> None:
    """A 260-token byte-level BPE vocabulary: the 256 byte symbols, two merges, BOS and EOS."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = [bytes_to_unicode()[b] for b in range(256)] + ["Ġt", "he", "<BOS>", "<EOS>"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(["Ġ t", "h e"])
    writer.add_token_types([gguf.TokenType.NORMAL] * 258 + [gguf.TokenType.CONTROL] * 2)
    writer.add_bos_token_id(258)
    writer.add_eos_token_id(259)
    writer.add_chat_template("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")


GGUF_FAMILIES = {
    "stablelm-qk-norm-bias": ("stablelm", "stablelm", {"qk_layernorm": True, "use_qkv_bias": True}),
    # a full rotation must not fall back to StableLmConfig's default quarter
    "stablelm-parallel-full-rotary": ("stablelm", "stablelm", {"use_parallel_residual": True, "qk_layernorm": False,
                                                                "partial_rotary_factor": 1.0}),
    "command-r-qk-norm": ("command-r", "cohere", {"use_qk_norm": True}),
    "cohere2": ("cohere2", "cohere2", {"num_hidden_layers": 4, "sliding_window_pattern": 4}),
}


@torch.inference_mode()
@pytest.mark.parametrize("case", sorted(GGUF_FAMILIES))
def test_llama_cpp_gguf_of_stablelm_and_cohere_matches_transformers(case: str, tmp_path: Path, cache: Path) -> None:
    arch, kind, overrides = GGUF_FAMILIES[case]
    hf = save_tiny_model(str(tmp_path / "hf"), tiny_config(kind, **overrides))
    file = tmp_path / f"tiny-{case}.gguf"
    write_llama_cpp_gguf(file, hf, arch)
    model: Any = load_model(resolve_model(str(file), str(cache)), torch.float32, "cpu")
    ours, theirs = model.config, hf.config
    for key in ("qk_layernorm", "use_qkv_bias", "use_parallel_residual", "use_qk_norm", "logit_scale",
                "sliding_window", "layer_types", "tie_word_embeddings", "num_key_value_heads"):
        assert getattr(ours, key, None) == getattr(theirs, key, None), key
    assert ours.rope_parameters == theirs.rope_parameters
    prompt = list(range(3, 40, 3))  # 13 tokens: past Cohere2's window of 6
    assert rel_err(Harness(model).prefill(0, prompt), hf(torch.tensor([prompt])).logits[0]) < 1e-4


def test_command_r_gguf_tokenizer_and_chat_template_are_read_from_the_file(tmp_path: Path, cache: Path) -> None:
    hf = save_tiny_model(str(tmp_path / "hf"), tiny_config("cohere", vocab_size=260, num_hidden_layers=1))
    file = tmp_path / "tiny-command-r.gguf"
    write_llama_cpp_gguf(file, hf, "command-r", tokenizer=True)
    path = resolve_model(str(file), str(cache))
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode(" the", add_special_tokens=False)) == ["Ġt", "he"]
    assert tokenizer.decode(tokenizer.encode("a the b", add_special_tokens=False)) == "a the b"
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<BOS>", "<EOS>")
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<user>hi"
    config = AutoConfig.from_pretrained(path)
    assert (config.bos_token_id, config.eos_token_id, config.vocab_size) == (258, 259, 260)


@torch.inference_mode()
def test_stablelm_gguf_layout_is_the_one_transformers_reads(tmp_path: Path, cache: Path) -> None:
    """transformers' own GGUF loader (which knows StableLM, though not its per-head norms or a
    full rotation) reads the written file back to the same model: the writer lays q/k out as
    llama.cpp does, and so does our conversion."""
    from transformers import AutoModelForCausalLM

    hf = save_tiny_model(str(tmp_path / "hf"), tiny_config("stablelm", qk_layernorm=False, use_qkv_bias=True))
    file = tmp_path / "tiny-stablelm.gguf"
    write_llama_cpp_gguf(file, hf, "stablelm")
    prompt = list(range(3, 40, 3))
    expected = hf(torch.tensor([prompt])).logits[0]
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=file.name, dtype=torch.float32)
    assert rel_err(ref(torch.tensor([prompt])).logits[0], expected) < 1e-5
    model = load_model(resolve_model(str(file), str(cache)), torch.float32, "cpu")
    assert rel_err(Harness(model).prefill(0, prompt), expected) < 1e-4
