"""Where each tensor of a converted GGUF directory lives: in the GGUF file itself, by offset.

A conversion (`engine.models.gguf`, `engine.models.gguf_families`) writes no float copy of a
tensor of two or more dimensions: `GGUF_TENSORS_FILE` records, under the tensor's transformers
name, a `TensorRef` (the file's byte offset, ggml type and shape of each part, and how its rows
are re-laid: llama.cpp's interleaved rotary rows, fused q | k | v blocks), and
`engine.models.gguf_source` reads it at load, lazily and row by row. Only one-dimensional
tensors (norms, biases, the shared-expert gate), which have no blocks and are small, are
dequantized at conversion and written to `model.safetensors`. A stacked experts tensor
[E, rows, cols] becomes one reference per expert (its offset moved by the expert's bytes); a
fused tensor made of several file tensors (ChatGLM's separate q / k / v) joins its parts' rows;
DeepSeek-V2's kv_b_proj, from `attn_k_b` / `attn_v_b`, is joined at load (`join` "kv_b").
`blocks` marks the references whose blocks the CPU kernels serve as they are stored.

Conversion memory is bounded by one tensor: the file is memory-mapped by `gguf.GGUFReader`,
and only one-dimensional tensors and one row of each referenced one (to refuse a type that
cannot be dequantized while converting) are ever read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engine.layers.rotary import interleaved_to_half_rows
from engine.models.gguf_fingerprint import gguf_fingerprint

GGUF_TENSORS_FILE = "gguf-tensors.json"
ROPE, QKV_HEADS = "rope", "qkv_heads"  # the row re-layouts a reference may name
_FLOAT_TYPES = {0: "F32", 1: "F16", 30: "BF16"}  # ggml type id -> the safetensors dtype name


def undo_rope_permute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Rows of q/k (weight [H * D, in] or bias [H * D]) from llama.cpp's layout to HF's.

    llama.cpp stores head h's rows as (d/2, 2) pairs [x0, x_{D/2}, x1, ...]; HF as (2, d/2).
    """
    return interleaved_to_half_rows(weight, num_heads)


def qkv_blocks_to_heads(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Fused q | k | v rows (weight [3 * H * D, in] or bias) -> multi-head GPTBigCode's or
    BLOOM's [H, (q, k, v), D] rows."""
    rest = weight.shape[1:]
    return weight.reshape(3, num_heads, -1, *rest).transpose(0, 1).reshape(weight.shape)


def relayout_rows(value: torch.Tensor, relayout: tuple[str, int] | None) -> torch.Tensor:
    """`value`'s rows (values, raw blocks or row ids) in transformers' order."""
    if relayout is None:
        return value
    kind, heads = relayout
    return undo_rope_permute(value, heads) if kind == ROPE else qkv_blocks_to_heads(value, heads)


@dataclass(frozen=True, slots=True)
class Part:
    """One tensor region of the GGUF file: `shape` in torch's order (slowest first), its rows
    re-laid by `relayout` ((kind, heads) or None) when read."""

    offset: int  # absolute byte offset in the file
    qtype: int  # ggml type id
    shape: tuple[int, ...]
    relayout: tuple[str, int] | None = None

    @property
    def num_rows(self) -> int:
        return int(np.prod(self.shape[:-1]))

    @property
    def row_bytes(self) -> int:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(self.qtype)]
        return self.shape[-1] // block * size


@dataclass(frozen=True, slots=True)
class TensorRef:
    """A converted tensor read from the GGUF file: its parts' rows one after the other
    (`join` "rows"), or DeepSeek-V2's kv_b_proj from its key and value halves ("kv_b")."""

    parts: tuple[Part, ...]
    join: str = "rows"
    blocks: bool = False  # served in its blocks by the CPU kernels where they apply

    @property
    def shape(self) -> tuple[int, ...]:
        first = self.parts[0]
        if self.join == "kv_b":  # k_b [H, r, dn], v_b [H, dv, r] -> [H * (dn + dv), r]
            heads, rank, nope = first.shape
            return heads * (nope + self.parts[1].shape[1]), rank
        return sum(p.shape[0] for p in self.parts), *first.shape[1:]

    @property
    def dtype_name(self) -> str:
        names = {_FLOAT_TYPES.get(p.qtype, "F32") for p in self.parts}
        return names.pop() if len(names) == 1 else "F32"


Planned = torch.Tensor | TensorRef  # a dense one-dimensional tensor, or a reference


def tensor_part(tensor: Any, relayout: tuple[str, int] | None = None) -> Part:
    """A `gguf.ReaderTensor` as a `Part` (ggml lists the fastest dim first: reversed)."""
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return Part(int(tensor.data_offset), int(tensor.tensor_type), shape, relayout)


def split_experts(part: Part) -> list[Part]:
    """A stacked experts tensor [E, rows, cols] -> one part per expert."""
    expert_bytes = part.num_rows // part.shape[0] * part.row_bytes
    return [Part(part.offset + e * expert_bytes, part.qtype, part.shape[1:]) for e in range(part.shape[0])]


def check_readable(tensor: Any) -> None:
    """Dequantize one row of `tensor` now, so that a type gguf cannot dequantize is refused
    at conversion, as when every tensor was dequantized there."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    if int(tensor.tensor_type) in _FLOAT_TYPES:
        return
    row = np.asarray(tensor.data).reshape(-1, tensor.data.shape[-1])[:1]
    try:
        dequantize(row, tensor.tensor_type)
    except NotImplementedError as e:
        name = GGMLQuantizationType(int(tensor.tensor_type)).name
        raise ValueError(f"GGUF tensor {tensor.name!r}: quantization {name} is not supported") from e


def write_converted(items: Iterable[tuple[str, Planned]], out_dir: str, gguf_path: str, tied: bool = False) -> None:
    """`model.safetensors` (the dense tensors) and `GGUF_TENSORS_FILE` (the references) of
    `items` into `out_dir`; with `tied`, no `lm_head.weight` (the embedding serves as head)."""
    from safetensors.torch import save_file

    dense: dict[str, torch.Tensor] = {}
    refs: dict[str, TensorRef] = {}
    for name, value in items:
        if tied and name == "lm_head.weight":
            continue
        if isinstance(value, TensorRef):
            refs[name] = value
        else:
            dense[name] = value.contiguous()
    save_file(dense, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    manifest = {
        "source": os.path.abspath(gguf_path),
        "fingerprint": gguf_fingerprint(gguf_path),
        "tensors": {name: _ref_to_json(ref) for name, ref in refs.items()},
    }
    with open(os.path.join(out_dir, GGUF_TENSORS_FILE), "w") as f:
        json.dump(manifest, f)


def read_manifest(path: str) -> dict[str, Any] | None:
    """The references file of the converted directory `path` (None where it has none)."""
    file = os.path.join(path, GGUF_TENSORS_FILE)
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        manifest: dict[str, Any] = json.load(f)
    return manifest


def refs_of(manifest: dict[str, Any]) -> Iterator[tuple[str, TensorRef]]:
    for name, entry in manifest["tensors"].items():
        yield name, _ref_from_json(entry)


def _ref_to_json(ref: TensorRef) -> dict[str, Any]:
    parts = [[p.offset, p.qtype, list(p.shape), list(p.relayout) if p.relayout else None] for p in ref.parts]
    return {"parts": parts, "join": ref.join, "blocks": ref.blocks}


def _ref_from_json(entry: dict[str, Any]) -> TensorRef:
    parts = tuple(
        Part(int(offset), int(qtype), tuple(shape), (str(relayout[0]), int(relayout[1])) if relayout else None)
        for offset, qtype, shape, relayout in entry["parts"]
    )
    return TensorRef(parts, entry["join"], bool(entry["blocks"]))


def dense_or_ref(
    tensor: Any, relayout: tuple[str, int] | None, blocks: bool, dequantize: Callable[[Any], torch.Tensor]
) -> Planned:
    """A one-dimensional file tensor dequantized (rows re-laid), any other as a reference."""
    if len(tensor.shape) == 1:
        return relayout_rows(dequantize(tensor), relayout)
    check_readable(tensor)
    return TensorRef((tensor_part(tensor, relayout),), blocks=blocks)
