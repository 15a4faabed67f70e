"""GGUF files for the CPU comparison with llama.cpp (scripts/cpu_vs_llama_server.py).

    python scripts/bench_gguf.py default --quant Q8_0 --out smollm2.Q8_0.gguf
    python scripts/bench_gguf.py random-llama --quant Q4_K_M --out llama1b.Q4_K_M.gguf
    python scripts/bench_gguf.py random-llama --shape 8b --quant Q4_K_M --out llama8b.Q4_K_M.gguf

`default`: the embedded default model's GGUF (SmolLM2-135M-Instruct, shipped as Q4_1 with a
Q8_0 embedding) with its 4-bit matrices re-quantized to Q4_0, Q4_1 or Q8_0 (from the shipped
weights, so Q8_0 holds the Q4_1 values almost exactly); `Q4_1` copies the file unchanged.
`random-llama`: a Llama-architecture model of random weights (std 0.02), by default shaped
as a 1B model (16 layers, hidden 2048, 32 heads, 8 kv heads, ffn 8192, tied embedding) with
the default model's tokenizer (49 152 ids), in Q8_0 or in the mix llama.cpp calls Q4_K_M:
Q4_K everywhere except Q6_K for the embedding (it is also the output) and for `attn_v` and
`ffn_down` of the layers llama.cpp gives more bits (the first and last eighth and every
third in between). `--shape 8b`: Llama-3-8B's sizes (32 layers, hidden 4096, ffn 14 336, a
128 256-id untied head: Q4_K embedding, Q6_K output, as in its Q4_K_M file). Tensors are
written one at a time, so writing an 8B file needs the memory of one quantized tensor.
`gguf.quants` has no K-quant quantizers, so Q4_K and Q6_K are written
here (one scale and min per group from its range, no search) and checked against
`gguf.quants.dequantize` by tests/bench/test_bench_gguf.py.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

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


class LlamaShape(NamedTuple):
    layers: int = 16
    hidden: int = 2048
    heads: int = 32
    kv_heads: int = 8
    ffn: int = 8192
    vocab: int | None = None  # None: the tokenizer's
    tied: bool = True


# 1b: the default above; 8b: Llama-3-8B's sizes (an untied 128 256-id head, as its Q4_K_M file)
SHAPES = {"1b": LlamaShape(), "8b": LlamaShape(32, 4096, 32, 8, 14336, 128256, tied=False)}
_CHUNK_ROWS = 2048  # rows drawn and quantized at once: a tensor is never whole in float32


def _random_tensors(shape: LlamaShape, vocab: int, mix: str) -> list[tuple[str, int, int, str]]:
    """(name, rows, cols, ggml type) of every tensor, in file order; `ones` marks a norm."""
    head_dim = shape.hidden // shape.heads
    kv, q8 = shape.kv_heads * head_dim, mix == "Q8_0"

    def qtype(kind: str) -> str:
        return "Q8_0" if q8 else kind

    # Q4_K_M: a tied embedding doubles as the output (Q6_K); an untied one is Q4_K, its output Q6_K
    out = [("token_embd.weight", vocab, shape.hidden, qtype("Q6_K" if shape.tied else "Q4_K")),
           ("output_norm.weight", 1, shape.hidden, "ones")]
    if not shape.tied:
        out.append(("output.weight", vocab, shape.hidden, qtype("Q6_K")))
    for i in range(shape.layers):
        wide = qtype("Q6_K" if more_bits(i, shape.layers) else "Q4_K")
        out += [(f"blk.{i}.attn_norm.weight", 1, shape.hidden, "ones"), (f"blk.{i}.ffn_norm.weight", 1, shape.hidden, "ones"),
                (f"blk.{i}.attn_q.weight", shape.hidden, shape.hidden, qtype("Q4_K")),
                (f"blk.{i}.attn_k.weight", kv, shape.hidden, qtype("Q4_K")), (f"blk.{i}.attn_v.weight", kv, shape.hidden, wide),
                (f"blk.{i}.attn_output.weight", shape.hidden, shape.hidden, qtype("Q4_K")),
                (f"blk.{i}.ffn_gate.weight", shape.ffn, shape.hidden, qtype("Q4_K")),
                (f"blk.{i}.ffn_up.weight", shape.ffn, shape.hidden, qtype("Q4_K")),
                (f"blk.{i}.ffn_down.weight", shape.hidden, shape.ffn, wide)]  # fmt: skip
    return out


def write_random_llama(out: Path, mix: str, shape: LlamaShape = SHAPES["1b"], seed: int = 0) -> None:
    """A Llama of random weights (std 0.02) in `mix` (Q4_K_M or Q8_0) with the default model's
    tokenizer, written tensor by tensor (each drawn and quantized in chunks of rows): memory
    holds one quantized tensor, never the model."""
    reader = gguf.GGUFReader(default_model_path())
    vocab = shape.vocab or len(reader.fields["tokenizer.ggml.tokens"].data)
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name(f"random-llama-{shape.layers}x{shape.hidden}")
    _copy_fields(reader, writer, keep=lambda key: key.startswith("tokenizer.") or key == "general.quantization_version")
    writer.add_file_type(FILE_TYPES[mix])
    writer.add_context_length(8192)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_freq_base(500000.0)
    writer.add_rope_dimension_count(shape.hidden // shape.heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    tensors = _random_tensors(shape, vocab, mix)
    for name, rows, cols, kind in tensors:
        if kind == "ones":
            writer.add_tensor_info(name, [cols], np.dtype(np.float32), cols * 4)
        else:
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
            nbytes = rows * cols // block * size
            writer.add_tensor_info(name, [rows, cols // block * size], np.dtype(np.uint8), nbytes,
                                   raw_dtype=gguf.GGMLQuantizationType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for _, rows, cols, kind in tensors:
        if kind == "ones":
            writer.write_tensor_data(np.ones(cols, dtype=np.float32))
            continue
        qtype = gguf.GGMLQuantizationType[kind]
        chunks = [quantize(rng.standard_normal((min(_CHUNK_ROWS, rows - r), cols), dtype=np.float32) * np.float32(0.02),
                           qtype) for r in range(0, rows, _CHUNK_ROWS)]  # fmt: skip
        writer.write_tensor_data(chunks[0] if len(chunks) == 1 else np.concatenate(chunks))
        del chunks
    writer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=("default", "random-llama"))
    parser.add_argument("--quant", required=True, help=f"default: {', '.join(REQUANT_TYPES)}; "
                        f"random-llama: {', '.join(RANDOM_MIXES)}")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b", help="random-llama only: 1b (default) or 8b")
    parser.add_argument("--layers", type=int, default=None, help="random-llama only: the shape's layers otherwise")
    args = parser.parse_args(argv)
    allowed = REQUANT_TYPES if args.model == "default" else RANDOM_MIXES
    if args.quant not in allowed:
        parser.error(f"--quant for {args.model} must be one of {', '.join(allowed)}, not {args.quant!r}")
    if args.layers is not None and args.layers < 1:
        parser.error("--layers must be at least 1")
    tmp = args.out.with_name(args.out.name + ".partial")
    if args.model == "default":
        write_default(tmp, args.quant)
    else:
        shape = SHAPES[args.shape]
        write_random_llama(tmp, args.quant, shape._replace(layers=args.layers or shape.layers))
    tmp.replace(args.out)  # an interrupted run leaves no file that looks whole
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
