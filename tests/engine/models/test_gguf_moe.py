"""GGUF round trips of the mixture-of-experts families: `qwen2moe`, `qwen3moe`, and Mixtral as
`llama` with experts (llama.cpp's stacked `ffn_*_exps` tensors, the router `ffn_gate_inp`, the
shared expert `ffn_*_shexp` with its gate)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from torch import nn

from engine.models import load_model, resolve_model
from tests.engine.models.harness import Harness, converted_tensors, rel_err, save_tiny_model, tiny_config
from tests.engine.models.test_gguf import _gguf_name, _rope_permute

QT = gguf.GGMLQuantizationType
_MOE_NAMES = {
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
}


def _stacked(out: dict[str, np.ndarray], layer: str, part: str, w: torch.Tensor, per_expert: bool) -> None:
    if per_expert:  # older Mixtral files: blk.N.ffn_gate.E.weight
        for e in range(w.shape[0]):
            out[f"blk.{layer}.ffn_{part}.{e}.weight"] = w[e].contiguous().numpy()
    else:
        out[f"blk.{layer}.ffn_{part}_exps.weight"] = w.contiguous().numpy()


def _moe_tensors(hf: nn.Module, per_expert: bool = False) -> dict[str, np.ndarray]:
    """llama.cpp's names and layouts of `hf`'s tensors (transformers holds the experts stacked:
    gate_up_proj [E, 2I, H], down_proj [E, H, I]; llama.cpp stacks gate, up and down apart, or
    in older Mixtral files keeps one tensor per expert)."""
    cfg: Any = hf.config
    out: dict[str, np.ndarray] = {}
    for name, tensor in hf.state_dict().items():
        w = tensor.detach().float()
        if name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            if rest == "mlp.experts.gate_up_proj":
                gate, up = w.chunk(2, dim=1)
                _stacked(out, layer, "gate", gate, per_expert)
                _stacked(out, layer, "up", up, per_expert)
                continue
            if rest == "mlp.experts.down_proj":
                _stacked(out, layer, "down", w, per_expert)
                continue
            if rest in _MOE_NAMES:
                out[f"blk.{layer}.{_MOE_NAMES[rest]}"] = w.reshape(-1).numpy() if "shared_expert_gate" in rest else w.numpy()
                continue
        if cfg.model_type == "mixtral" and ".q_proj." in name:
            w = _rope_permute(w, cfg.num_attention_heads)
        elif cfg.model_type == "mixtral" and ".k_proj." in name:
            w = _rope_permute(w, cfg.num_key_value_heads)
        out[_gguf_name(name)] = w.numpy()
    return out


def write_moe_gguf(
    path: Path, hf: nn.Module, arch: str, qtype: gguf.GGMLQuantizationType = QT.F32, per_expert: bool = False
) -> None:
    cfg: Any = hf.config
    writer = gguf.GGUFWriter(str(path), arch)
    if getattr(cfg, "head_dim", None):
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_expert_count(cfg.num_experts)
    writer.add_expert_used_count(cfg.num_experts_per_tok)
    if getattr(cfg, "moe_intermediate_size", None):
        writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if getattr(cfg, "shared_expert_intermediate_size", None):
        writer.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    for name, t in _moe_tensors(hf, per_expert).items():
        if t.ndim == 1 or qtype == QT.F32 or "ffn_gate_inp" in name:
            writer.add_tensor(name, t)
        else:
            writer.add_tensor(name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# (tiny_config kind, GGUF architecture, overrides, experts one tensor each): every layer
# sparse, as llama.cpp has them
CASES = {
    "mixtral": ("mixtral", "llama", {}, False),
    "mixtral-per-expert": ("mixtral", "llama", {}, True),
    "qwen2moe": ("qwen2_moe", "qwen2moe", {"mlp_only_layers": []}, False),
    "qwen3moe": ("qwen3_moe", "qwen3moe", {}, False),
}


@torch.inference_mode()
@pytest.mark.parametrize("case", sorted(CASES))
def test_moe_gguf_model_matches_original(case: str, tmp_path: Path) -> None:
    kind, arch, overrides, per_expert = CASES[case]
    config = tiny_config(kind, num_hidden_layers=1, tie_word_embeddings=False, **overrides)
    hf = save_tiny_model(str(tmp_path / "hf"), config)
    file = tmp_path / f"tiny-{case}.gguf"
    write_moe_gguf(file, hf, arch, per_expert=per_expert)
    model: Any = load_model(resolve_model(str(file), str(tmp_path / "cache")), torch.float32, "cpu")
    assert type(model).__name__ == config.architectures[0]
    assert model.config.num_experts_per_tok == 2
    assert model.model.layers[0].mlp.experts.routing.renormalize == (kind != "qwen2_moe")
    prompt = list(range(3, 40, 3))
    assert rel_err(Harness(model).prefill(0, prompt), hf(torch.tensor([prompt])).logits[0]) < 1e-4


def test_quantized_expert_tensors_dequantize_per_expert(tmp_path: Path) -> None:
    """Q8_0 stacked experts come back, expert by expert, as gguf's own dequantization gives them."""
    hf = save_tiny_model(str(tmp_path / "hf"), tiny_config("qwen3_moe", num_hidden_layers=1))
    file = tmp_path / "tiny-q8.gguf"
    write_moe_gguf(file, hf, "qwen3moe", QT.Q8_0)
    converted = converted_tensors(resolve_model(str(file), str(tmp_path / "cache")))
    reader = gguf.GGUFReader(str(file))
    stacked = next(t for t in reader.tensors if t.name == "blk.0.ffn_down_exps.weight")
    shape = tuple(int(n) for n in reversed(stacked.shape))
    expected = torch.from_numpy(np.array(gguf.quants.dequantize(stacked.data, stacked.tensor_type))).reshape(shape)
    assert shape == (8, 64, 32)
    for e in range(8):
        assert torch.equal(converted[f"model.layers.0.mlp.experts.{e}.down_proj.weight"], expected[e])
    assert rel_err(expected, hf.model.layers[0].mlp.experts.down_proj.detach()) < 0.05
