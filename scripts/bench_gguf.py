"""GGUF files for the CPU comparison with llama.cpp (scripts/cpu_vs_llama_server.py).

    python scripts/bench_gguf.py default --quant Q8_0 --out smollm2.Q8_0.gguf
    python scripts/bench_gguf.py random-llama --quant Q4_K_M --out llama1b.Q4_K_M.gguf

`default`: the embedded default model's GGUF (SmolLM2-135M-Instruct, shipped as Q4_1 with a
Q8_0 embedding) with its 4-bit matrices re-quantized to Q4_0, Q4_1 or Q8_0 (from the shipped
weights, so Q8_0 holds the Q4_1 values almost exactly); `Q4_1` copies the file unchanged.
`random-llama`: a Llama-architecture model of random weights (std 0.02), by default shaped
as a 1B model (16 layers, hidden 2048, 32 heads, 8 kv heads, ffn 8192, tied embedding) with
the default model's tokenizer (49 152 ids), in Q8_0 or in the mix llama.cpp calls Q4_K_M:
Q4_K everywhere except Q6_K for the embedding (it is also the output) and for `attn_v` and
`ffn_down` of the layers llama.cpp gives more bits (the first and last eighth and every
third in between). `gguf.quants` has no K-quant quantizers, so Q4_K and Q6_K are written
here (one scale and min per group from its range, no search) and checked against
`gguf.quants.dequantize` by tests/bench/test_bench_gguf.py.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

QK_K = 256
REQUANT_TYPES = ("Q4_0", "Q4_1", "Q8_0")
RANDOM_MIXES = ("Q4_K_M", "Q8_0")
FILE_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q4_K_M": 15}  # llama.cpp's LLAMA_FTYPE_MOSTLY_*


def default_model_path() -> str:
    from engine.models.loader import default_gguf_path

    return default_gguf_path()


# -- K-quant writers ----------------------------------------------------------------------


def quantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    """[n, 256] float32 -> [n, 144] uint8 Q4_K blocks: x = d * sc * q - dmin * m per group of 32."""
    n = blocks.shape[0]
    groups = blocks.reshape(n, 8, 32)
    lo = np.minimum(groups.min(axis=-1), 0.0)  # the offset is never positive
    hi = groups.max(axis=-1)
    scale = (hi - lo) / 15.0
    offset = -lo
    d = (scale.max(axis=-1) / 63.0).astype(np.float16)
    dmin = (offset.max(axis=-1) / 63.0).astype(np.float16)
    d32, dmin32 = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.clip(np.round(np.divide(scale, d32, out=np.zeros_like(scale), where=d32 > 0)), 0, 63).astype(np.uint8)
    mn = np.clip(np.round(np.divide(offset, dmin32, out=np.zeros_like(offset), where=dmin32 > 0)), 0, 63)
    mn = mn.astype(np.uint8)
    step = (d32 * sc)[..., None]
    q = np.divide(groups + (dmin32 * mn)[..., None], step, out=np.zeros_like(groups), where=step > 0)
    q = np.clip(np.round(q), 0, 15).astype(np.uint8)
    # 12 scale bytes: 6-bit scales and mins of groups 0-3, their top bits carrying groups 4-7's
    scales = np.empty((n, 12), dtype=np.uint8)
    scales[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    pairs = q.reshape(n, 4, 2, 32)  # byte chunk c: group 2c in the low nibble, 2c + 1 in the high
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(n, 128)
    return np.concatenate([d[:, None].view(np.uint8), dmin[:, None].view(np.uint8), scales, qs], axis=1)


def quantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    """[n, 256] float32 -> [n, 210] uint8 Q6_K blocks: x = d * sc * (q - 32) per group of 16."""
    n = blocks.shape[0]
    groups = blocks.reshape(n, 16, 16)
    scale = np.abs(groups).max(axis=-1) / 31.0
    d = (scale.max(axis=-1) / 127.0).astype(np.float16)
    d32 = d.astype(np.float32)[:, None]
    sc = np.clip(np.round(np.divide(scale, d32, out=np.zeros_like(scale), where=d32 > 0)), 0, 127)
    step = (d32 * sc)[..., None]
    q = np.divide(groups, step, out=np.zeros_like(groups), where=step > 0)
    q = (np.clip(np.round(q), -32, 31) + 32).astype(np.uint8).reshape(n, QK_K)
    low = (q & 0x0F).reshape(n, 2, 2, 64)
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128)
    high = (q >> 4).reshape(n, 2, 4, 32)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(n, 64)
    return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), d[:, None].view(np.uint8)], axis=1)


_K_WRITERS: dict[gguf.GGMLQuantizationType, Callable[[np.ndarray], np.ndarray]] = {
    gguf.GGMLQuantizationType.Q4_K: quantize_q4_k,
    gguf.GGMLQuantizationType.Q6_K: quantize_q6_k,
}


def quantize(weights: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """A [rows, cols] float32 matrix as GGUF blocks ([rows, bytes per row] uint8)."""
    writer = _K_WRITERS.get(qtype)
    if writer is None:
        return gguf.quants.quantize(weights, qtype)
    rows, cols = weights.shape
    if cols % QK_K:
        raise ValueError(f"{qtype.name} needs rows of a multiple of {QK_K} values, not {cols}")
    return writer(weights.reshape(-1, QK_K).astype(np.float32)).reshape(rows, -1)


# -- the default model, re-quantized --------------------------------------------------------


def _copy_fields(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, keep: Callable[[str], bool]) -> None:
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or not keep(key):
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type)


def write_default(out: Path, quant: str) -> None:
    """The default model's GGUF with its 4-bit matrices in `quant` (Q4_1: copied as shipped)."""
    src = default_model_path()
    if quant == "Q4_1":
        shutil.copyfile(src, out)
        return
    target = gguf.GGMLQuantizationType[quant]
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(str(out), "llama")
    _copy_fields(reader, writer, keep=lambda key: key != "general.file_type")
    writer.add_file_type(FILE_TYPES[quant])
    for tensor in reader.tensors:
        shape = [int(x) for x in reversed(tensor.shape.tolist())]  # numpy order: rows first
        if tensor.tensor_type == gguf.GGMLQuantizationType.Q4_1:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)
            writer.add_tensor(tensor.name, quantize(values, target), raw_dtype=target)
        elif tensor.tensor_type == gguf.GGMLQuantizationType.F32:  # norms
            writer.add_tensor(tensor.name, np.asarray(tensor.data).reshape(shape))
        else:  # the Q8_0 embedding stays as shipped (its bytes, one row of blocks per token)
            writer.add_tensor(tensor.name, np.asarray(tensor.data), raw_dtype=tensor.tensor_type)
    _finish(writer)


def _finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# -- a random-weight Llama -------------------------------------------------------------------


def more_bits(layer: int, layers: int) -> bool:
    """The layers whose attn_v and ffn_down llama.cpp's Q4_K_M keeps in Q6_K."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def write_random_llama(out: Path, mix: str, layers: int = 16, hidden: int = 2048, heads: int = 32,
                       kv_heads: int = 8, ffn: int = 8192, seed: int = 0) -> None:
    """A tied-embedding Llama of random weights in `mix` (Q4_K_M or Q8_0), the default model's tokenizer."""
    reader = gguf.GGUFReader(default_model_path())
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    head_dim = hidden // heads
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name(f"random-llama-{layers}x{hidden}")
    _copy_fields(reader, writer, keep=lambda key: key.startswith("tokenizer.") or key == "general.quantization_version")
    writer.add_file_type(FILE_TYPES[mix])
    writer.add_context_length(8192)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(500000.0)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    rng = np.random.default_rng(seed)
    q8, q4k, q6k = (gguf.GGMLQuantizationType[t] for t in ("Q8_0", "Q4_K", "Q6_K"))

    def add(name: str, rows: int, cols: int, qtype: gguf.GGMLQuantizationType) -> None:
        weights = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(0.02)
        writer.add_tensor(name, quantize(weights, q8 if mix == "Q8_0" else qtype), raw_dtype=q8 if mix == "Q8_0" else qtype)

    add("token_embd.weight", vocab, hidden, q6k)
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    for i in range(layers):
        wide = q6k if more_bits(i, layers) else q4k
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, dtype=np.float32))
        add(f"blk.{i}.attn_q.weight", hidden, hidden, q4k)
        add(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden, q4k)
        add(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden, wide)
        add(f"blk.{i}.attn_output.weight", hidden, hidden, q4k)
        add(f"blk.{i}.ffn_gate.weight", ffn, hidden, q4k)
        add(f"blk.{i}.ffn_up.weight", ffn, hidden, q4k)
        add(f"blk.{i}.ffn_down.weight", hidden, ffn, wide)
    _finish(writer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=("default", "random-llama"))
    parser.add_argument("--quant", required=True, help=f"default: {', '.join(REQUANT_TYPES)}; "
                        f"random-llama: {', '.join(RANDOM_MIXES)}")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--layers", type=int, default=16, help="random-llama only")
    args = parser.parse_args(argv)
    allowed = REQUANT_TYPES if args.model == "default" else RANDOM_MIXES
    if args.quant not in allowed:
        parser.error(f"--quant for {args.model} must be one of {', '.join(allowed)}, not {args.quant!r}")
    if args.layers < 1:
        parser.error("--layers must be at least 1")
    tmp = args.out.with_name(args.out.name + ".partial")
    if args.model == "default":
        write_default(tmp, args.quant)
    else:
        write_random_llama(tmp, args.quant, layers=args.layers)
    tmp.replace(args.out)  # an interrupted run leaves no file that looks whole
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
