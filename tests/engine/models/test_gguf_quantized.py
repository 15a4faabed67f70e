"""A quantized GGUF served in its blocks on the CPU (`gguf_weights` "quantized", the default):
the same greedy tokens as the dequantized path (float32 activations), the linear layers holding
the file's bytes and no float copy, and the dequantized path where asked or where a layer cannot
take blocks; with the default int8 activations of the K-quants, the greedy tokens of the
dequantized path fed the same int8 activations."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import gguf
import numpy as np
import pytest
import torch
from torch import nn

from engine.kernels import gguf_cpu
from engine.layers.gguf_linear import GGUFWeight
from engine.layers.linear import LinearBase
from engine.models import load_model, resolve_model
from tests.engine.kernels.test_gguf_cpu import int8_activations, random_blocks
from tests.engine.models.harness import Harness, save_tiny_model, tiny_config
from tests.engine.models.test_gguf import write_gguf

QT = gguf.GGMLQuantizationType


@pytest.fixture(autouse=True, scope="module")
def kernels() -> None:
    """The kernels build here (the CI machine has a C++ compiler): a failed build fails."""
    assert gguf_cpu.available(), f"the GGUF CPU kernels did not build: {gguf_cpu.build_error()}"

PROMPT = [5, 17, 42, 9, 100, 3, 77]
# Q4_K_M's and Q5_K_M's mixes: most projections in Q4_K / Q5_K, v and down in Q6_K (a fused
# q | k | v of two types)
K_MIXES = {"Q4_K_M": QT.Q4_K, "Q5_K_M": QT.Q5_K}
Q6_K_PARTS = {"attn_v": QT.Q6_K, "ffn_down": QT.Q6_K}


def write_k_quant_llama(path: Path, types: dict[str, QT], default: QT = QT.Q4_K) -> None:
    """A random 2-layer Llama GGUF (hidden 256: whole K-quant super-blocks) whose projections
    are random blocks of `types[part]` (else `default`), embeddings and norms in F32."""
    hidden, ffn, layers, vocab, heads, kv_heads = 256, 512, 2, 256, 4, 2
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(512)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.standard_normal((vocab, hidden)).astype(np.float32))
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    writer.add_tensor("output.weight", (rng.standard_normal((vocab, hidden)) * 0.2).astype(np.float32))
    kv = hidden // heads * kv_heads
    shapes = {"attn_q": (hidden, hidden), "attn_k": (kv, hidden), "attn_v": (kv, hidden),
              "attn_output": (hidden, hidden), "ffn_gate": (ffn, hidden), "ffn_up": (ffn, hidden),
              "ffn_down": (hidden, ffn)}  # fmt: skip
    for layer in range(layers):
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{layer}.{norm}.weight", np.ones(hidden, dtype=np.float32))
        for i, (part, (rows, cols)) in enumerate(shapes.items()):
            qtype = types.get(part, default)
            blocks = random_blocks(qtype, rows, cols, seed=10 * layer + i, scale=0.002)
            writer.add_tensor(f"blk.{layer}.{part}.weight", blocks, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def served_and_dequantized(file: Path, cache: Path, activations: str = "float32") -> tuple[nn.Module, nn.Module]:
    path = resolve_model(str(file), str(cache))
    served = load_model(path, torch.float32, "cpu", gguf_activations=activations)
    return served, load_model(path, torch.float32, "cpu", gguf_weights="dequantized")


def linear_layers(model: nn.Module) -> list[LinearBase]:
    return [m for m in model.modules() if isinstance(m, LinearBase)]


def resident_bytes(module: nn.Module) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type != "meta")


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> nn.Module:
    cfg = tiny_config("llama", num_hidden_layers=2, tie_word_embeddings=False)
    return save_tiny_model(str(tmp_path_factory.mktemp("hf")), cfg)


@torch.inference_mode()
@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_1], ids=lambda q: q.name)
def test_quantized_gguf_serves_the_dequantized_greedy_tokens(
    qtype: QT, tiny_hf: nn.Module, tmp_path: Path, cache: Path
) -> None:
    file = tmp_path / f"tiny-{qtype.name}.gguf"
    write_gguf(file, tiny_hf, qtype)
    served, dequantized = served_and_dequantized(file, cache)
    assert all(isinstance(m.packed_weight, GGUFWeight) for m in linear_layers(served))
    assert Harness(served).generate(PROMPT, 16) == Harness(dequantized).generate(PROMPT, 16)


@torch.inference_mode()
@pytest.mark.parametrize("mix", sorted(K_MIXES))
def test_k_quant_gguf_keeps_the_file_bytes_and_serves_the_dequantized_greedy_tokens(
    mix: str, tmp_path: Path, cache: Path
) -> None:
    file = tmp_path / f"tiny-{mix}.gguf"
    write_k_quant_llama(file, Q6_K_PARTS, default=K_MIXES[mix])
    served, dequantized = served_and_dequantized(file, cache)
    reader = gguf.GGUFReader(str(file))
    quantized_bytes = sum(int(t.n_bytes) for t in reader.tensors if t.tensor_type in (K_MIXES[mix], QT.Q6_K))
    layers = linear_layers(served)
    assert all(m.weight.device.type == "meta" and isinstance(m.packed_weight, GGUFWeight) for m in layers)
    assert sum(resident_bytes(m) for m in layers) == quantized_bytes  # the blocks, no float copy
    float_bytes = sum(resident_bytes(m) for m in linear_layers(dequantized))
    assert resident_bytes(served) == resident_bytes(dequantized) - float_bytes + quantized_bytes
    qkv: Any = served.model.layers[0].self_attn.qkv_proj
    assert [s.qtype for s in qkv.packed_weight.segments] == [int(K_MIXES[mix]), int(QT.Q6_K)]  # q | k, then v
    prompt = [p % 256 for p in PROMPT]
    assert Harness(served).generate(prompt, 16) == Harness(dequantized).generate(prompt, 16)


@torch.inference_mode()
@pytest.mark.parametrize("mix", sorted(K_MIXES))
def test_k_quants_take_int8_activations_by_default(mix: str, tmp_path: Path, cache: Path) -> None:
    """`gguf_activations` auto (the default): the K-quant layers multiply int8 activations where
    the kernels have that path, and generate the greedy tokens of the dequantized model whose
    linear layers see their input quantized as the kernels quantize it (blocks of 256)."""
    file = tmp_path / f"tiny-{mix}.gguf"
    write_k_quant_llama(file, Q6_K_PARTS, default=K_MIXES[mix])
    served, dequantized = served_and_dequantized(file, cache, activations="auto")
    int8_types = gguf_cpu.K_QUANT_TYPES if gguf_cpu.has_int8_activations() else frozenset()
    assert all(m.packed_weight.int8_types == int8_types for m in linear_layers(served))
    if int8_types:
        for layer in linear_layers(dequantized):
            layer.register_forward_pre_hook(lambda _, args: (int8_activations(args[0], QT.Q4_K), *args[1:]))
    prompt = [p % 256 for p in PROMPT]
    assert Harness(served).generate(prompt, 16) == Harness(dequantized).generate(prompt, 16)


@torch.inference_mode()
def test_a_fused_layer_with_an_unquantized_part_and_unsupported_types_are_dequantized(
    tmp_path: Path, cache: Path
) -> None:
    """k in F16 beside q and v in Q8_0: the fused q | k | v is served dense, the rest in blocks;
    an unsupported type (Q2_K) is dequantized at load as before."""
    file = tmp_path / "tiny-mixed.gguf"
    write_k_quant_llama(file, {"attn_q": QT.Q8_0, "attn_v": QT.Q8_0, "attn_k": QT.F16, "ffn_up": QT.Q2_K})
    served, dequantized = served_and_dequantized(file, cache)
    layer: Any = served.model.layers[0]
    assert layer.self_attn.qkv_proj.weight.device.type == "cpu"
    assert not isinstance(layer.self_attn.qkv_proj.packed_weight, GGUFWeight)
    assert not isinstance(layer.mlp.gate_up_proj.packed_weight, GGUFWeight)  # Q2_K's up beside Q4_K's gate
    assert isinstance(layer.self_attn.o_proj.packed_weight, GGUFWeight)
    torch.testing.assert_close(
        layer.self_attn.qkv_proj.weight, dequantized.model.layers[0].self_attn.qkv_proj.weight, rtol=0, atol=0
    )
    prompt = [p % 256 for p in PROMPT]
    assert Harness(served).generate(prompt, 16) == Harness(dequantized).generate(prompt, 16)


@torch.inference_mode()
def test_tied_embedding_and_lm_head_share_the_file_blocks(tmp_path: Path, cache: Path) -> None:
    """A tied model (as the default model, whose token_embd is Q8_0): the embedding looks its
    rows up in the blocks and the LM head multiplies by them; one copy of the blocks."""
    hf = save_tiny_model(str(tmp_path / "hf"), tiny_config("llama", num_hidden_layers=1, tie_word_embeddings=True))
    file = tmp_path / "tiny-tied-Q8_0.gguf"
    state = {name: t for name, t in hf.state_dict().items() if name != "lm_head.weight"}  # no `output`: tied
    write_gguf(file, cast(nn.Module, SimpleNamespace(config=hf.config, state_dict=lambda: state)), QT.Q8_0)
    served, dequantized = served_and_dequantized(file, cache)
    embed, head = served.model.embed_tokens, served.lm_head  # type: ignore[union-attr]
    assert isinstance(embed.gguf_weight, GGUFWeight) and head.packed_weight is embed.gguf_weight
    assert embed.weight.device.type == "meta" and head.weight.device.type == "meta"
    ids = torch.tensor([0, 7, 255, 7])
    reference = dequantized.model.embed_tokens.weight[ids]  # type: ignore[union-attr]
    torch.testing.assert_close(embed(ids), reference, rtol=0, atol=0)
    block_bytes = embed.gguf_weight.segments[0].blocks.nbytes
    float_bytes = dequantized.model.embed_tokens.weight.nbytes  # type: ignore[union-attr]
    served_bytes = resident_bytes(served)
    assert served_bytes == resident_bytes(dequantized) - float_bytes + block_bytes - sum(
        resident_bytes(m) for m in linear_layers(dequantized)
    ) + sum(resident_bytes(m) for m in linear_layers(served))
    assert Harness(served).generate(PROMPT, 16) == Harness(dequantized).generate(PROMPT, 16)


def test_dequantized_opt_out_loads_float_weights(tiny_hf: nn.Module, tmp_path: Path, cache: Path) -> None:
    file = tmp_path / "tiny-Q8_0.gguf"
    write_gguf(file, tiny_hf, QT.Q8_0)
    _, dequantized = served_and_dequantized(file, cache)
    assert not any(isinstance(m.packed_weight, GGUFWeight) for m in linear_layers(dequantized))
    assert all(m.weight.device.type == "cpu" and m.weight.dtype == torch.float32 for m in linear_layers(dequantized))
