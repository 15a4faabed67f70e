"""A converted GGUF directory reads its tensors from the GGUF file: no float copy on disk, every
tensor read as the old conversion wrote it (bit for bit), shards read row by row."""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import pytest
import torch

from engine.distributed.lazy_weight import LazyWeight, read_weight
from engine.models import gguf_source, load_model, resolve_model
from engine.models.gguf import dequantize_tensor, hf_tensor_name, undo_rope_permute
from engine.models.gguf_source import gguf_weights
from tests.engine.models.harness import Harness, converted_tensors, dense_checkpoint
from tests.engine.models.test_gguf_quantized import write_k_quant_llama

QT = gguf.GGMLQuantizationType
# every type the kernels serve, one the kernels lack (Q2_K) and a float one (F16)
MIX = {"attn_q": QT.Q4_K, "attn_k": QT.Q5_K, "attn_v": QT.Q6_K, "attn_output": QT.Q8_0,
       "ffn_gate": QT.Q4_1, "ffn_up": QT.Q2_K, "ffn_down": QT.F16}  # fmt: skip
HEADS, KV_HEADS = 4, 2  # write_k_quant_llama's


@pytest.fixture()
def mixed(tmp_path: Path) -> Path:
    file = tmp_path / "mixed.gguf"
    write_k_quant_llama(file, MIX)
    return file


def _old_conversion(file: Path) -> dict[str, torch.Tensor]:
    """What the conversion wrote to model.safetensors before it kept tensors in the file."""
    out = {}
    for tensor in gguf.GGUFReader(str(file)).tensors:
        name = hf_tensor_name(tensor.name)
        assert name is not None
        value = dequantize_tensor(tensor)
        if ".q_proj." in name or ".k_proj." in name:
            value = undo_rope_permute(value, HEADS if ".q_proj." in name else KV_HEADS)
        out[name] = value.contiguous()
    return out


def test_every_tensor_reads_as_the_old_conversion_wrote_it(mixed: Path, cache: Path) -> None:
    converted = converted_tensors(resolve_model(str(mixed), str(cache)))
    old = _old_conversion(mixed)
    assert sorted(converted) == sorted(old)
    for name, value in old.items():
        assert converted[name].dtype == value.dtype, name
        assert torch.equal(converted[name], value), name


def test_the_cache_entry_holds_no_weights(mixed: Path, cache: Path) -> None:
    """Only norms are written (the file's tensors of two dimensions are read where they are)."""
    entry = resolve_model(str(mixed), str(cache))
    size = sum(os.path.getsize(os.path.join(entry, n)) for n in os.listdir(entry))
    assert size < 0.05 * os.path.getsize(mixed), (size, os.path.getsize(mixed))


def test_a_shard_reads_its_rows_and_columns_only(
    mixed: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows [a, b) of a permuted q and a column shard of down (read in chunks of rows) equal
    the slices of the whole tensor; the file rows read are the shard's only."""
    entry = resolve_model(str(mixed), str(cache))
    weights = dict(gguf_weights(entry))
    whole_q = read_weight(weights["model.layers.0.self_attn.q_proj.weight"])
    rows_read: list[int] = []
    real_rows = gguf_source.GGUFFile.rows

    def rows(self: gguf_source.GGUFFile, part: gguf_source.Part, ids: object) -> object:
        raw = real_rows(self, part, ids)  # type: ignore[arg-type]
        rows_read.append(raw.shape[0])
        return raw

    monkeypatch.setattr(gguf_source.GGUFFile, "rows", rows)
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    assert isinstance(q, LazyWeight)
    assert torch.equal(read_weight(q.narrow(0, 64, 128)), whole_q[64:192])
    assert rows_read == [128]
    monkeypatch.setattr(gguf_source, "_CHUNK_BYTES", 4 * 512 * 100)  # 100 rows of down at a time
    down = weights["model.layers.1.mlp.down_proj.weight"]
    whole_down = read_weight(down)
    rows_read.clear()
    assert torch.equal(read_weight(down.narrow(1, 256, 256)), whole_down[:, 256:])
    assert rows_read == [100, 100, 56]


def test_a_changed_source_file_is_refused_at_load(mixed: Path, cache: Path) -> None:
    entry = resolve_model(str(mixed), str(cache))
    with open(mixed, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(ValueError, match="changed since"):
        load_model(entry, torch.float32, "cpu")
    os.remove(mixed)
    with pytest.raises(ValueError, match="gone or changed"):
        load_model(entry, torch.float32, "cpu")


@torch.inference_mode()
def test_bfloat16_dense_load_equals_the_float32_one_rounded(mixed: Path, cache: Path) -> None:
    """The dense path in another dtype (as on a GPU, or with tensor parallelism): each weight
    is the dequantized value rounded once."""
    entry = resolve_model(str(mixed), str(cache))
    full = load_model(entry, torch.float32, "cpu", gguf_weights="dequantized")
    half = load_model(entry, torch.bfloat16, "cpu", gguf_weights="dequantized")
    for (name, a), (_, b) in zip(full.named_parameters(), half.named_parameters(), strict=True):
        assert torch.equal(a.to(torch.bfloat16), b), name


@torch.inference_mode()
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_weight_quantization_of_a_gguf_equals_that_of_its_dense_checkpoint(
    method: str, mixed: Path, cache: Path, tmp_path: Path
) -> None:
    """`--weight-quantization` loads a GGUF dense (as bf16) and quantizes it: the same model as
    from a directory holding every tensor dense, as conversions wrote it before."""
    from engine.models.quantize import quantize_model_weights

    entry = resolve_model(str(mixed), str(cache))
    from_gguf = load_model(entry, torch.bfloat16, "cpu", gguf_weights="dequantized")
    from_dense = load_model(dense_checkpoint(entry, str(tmp_path / "dense")), torch.bfloat16, "cpu")
    assert quantize_model_weights(from_gguf, method) == quantize_model_weights(from_dense, method) > 0
    prompt = [5, 17, 42, 9, 100, 3, 77]
    assert torch.equal(Harness(from_gguf).prefill(0, prompt), Harness(from_dense).prefill(0, prompt))
