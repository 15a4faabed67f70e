"""A converted GGUF directory's tensors, read at load from the GGUF file they came from.

`GGUF_TENSORS_FILE` (`engine.models.gguf_tensors`) names the file, its fingerprint and each
tensor's `TensorRef`. `gguf_weights` memory-maps the file and yields every reference as a
`LazyWeight` over a `GGUFTensorSource`: reading a region dequantizes only the file rows behind
it (llama.cpp's blocks run along a row, so rows are independent), in chunks of rows, so a
tensor-parallel rank that narrows first reads only its shard and a column shard never holds a
whole float tensor. A reference marked `blocks` also carries its raw rows
(`GGUFLazyWeight.gguf_blocks`, read by `engine.layers.gguf_linear`, which serves them as they
are stored). Quantized rows are dequantized by the GGUF CPU kernels where they built (exactly
gguf's dequantization), else by `gguf.quants.dequantize`; F32 / F16 / BF16 rows are copied.
The memory map lives as long as the yielded weights do: once loading ends, nothing of the
file stays mapped; while it loads, the pages of each tensor read are let go (`GGUFFile.rows`).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from engine.distributed.lazy_weight import LazyWeight
from engine.kernels import gguf_cpu
from engine.models.gguf_cache import hold_entry
from engine.models.gguf_fingerprint import gguf_fingerprint
from engine.models.gguf_tensors import Part, TensorRef, read_manifest, refs_of, relayout_rows

_CHUNK_BYTES = 64 << 20  # the float rows dequantized at once while reading part of each row


class GGUFFile:
    """The GGUF file a converted directory reads, memory-mapped; refused if its content is not
    the one the directory was converted from."""

    def __init__(self, path: str, fingerprint: str, directory: str) -> None:
        if not os.path.isfile(path) or gguf_fingerprint(path) != fingerprint:
            raise ValueError(
                f"{path} is gone or changed since {directory} was converted from it: "
                "load the GGUF file itself again, so that it is converted anew"
            )
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.data = np.frombuffer(self._map, dtype=np.uint8)

    def rows(self, part: Part, ids: np.ndarray | slice) -> np.ndarray:
        """Raw rows `ids` of `part` (uint8 [n, row_bytes]), copied out of the map; the map's
        pages of the part are let go after (the page cache keeps them), so that loading never
        holds the file's pages and their copies at once."""
        size = part.num_rows * part.row_bytes
        view = self.data[part.offset : part.offset + size].reshape(part.num_rows, part.row_bytes)
        out = np.array(view[ids])
        if hasattr(mmap, "MADV_DONTNEED"):
            start = part.offset - part.offset % mmap.PAGESIZE
            self._map.madvise(mmap.MADV_DONTNEED, start, part.offset + size - start)
        return out


def dequantize_rows(raw: np.ndarray, qtype: int, columns: int) -> torch.Tensor:
    """Raw rows uint8 [n, row_bytes] of ggml type `qtype` -> [n, columns] (F16 and BF16 keep
    their dtype, everything else float32)."""
    if qtype == 0:
        return torch.from_numpy(raw.view(np.float32))
    if qtype == 1:
        return torch.from_numpy(raw.view(np.float16))
    if qtype == 30:
        return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16)
    if qtype in gguf_cpu.SUPPORTED_TYPES and gguf_cpu.available():
        return gguf_cpu.gguf_dequantize(torch.from_numpy(raw), qtype, columns)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return torch.from_numpy(np.array(dequantize(raw, GGMLQuantizationType(qtype)), dtype=np.float32))


def _row_ids(part: Part) -> np.ndarray | None:
    """File row of each transformers row of a 2-D part (None: the same order)."""
    if part.relayout is None:
        return None
    return relayout_rows(torch.arange(part.num_rows), part.relayout).numpy()


class GGUFTensorSource:
    """A `TensorRef` as a `LazyWeight` source: `source[rows, cols, ...]` (slices) dequantizes
    the file rows behind `rows` only."""

    def __init__(self, file: GGUFFile, ref: TensorRef, name: str) -> None:
        self.file = file
        self.ref = ref
        self.name = name  # the tensor's transformers name

    def __getitem__(self, index: tuple[slice, ...]) -> torch.Tensor:
        if self.ref.join == "kv_b":  # a small latent projection: joined whole, then cut
            from engine.models.gguf_deepseek import join_kv_b

            k_b, v_b = (self._whole(p) for p in self.ref.parts)
            return join_kv_b(k_b, v_b)[index].clone()
        rows, rest = index[0], index[1:]
        pieces, first = [], 0
        for part in self.ref.parts:
            start, stop = max(rows.start, first), min(rows.stop, first + part.shape[0])
            if start < stop:
                pieces.append(self._part_rows(part, start - first, stop - first, rest))
            first += part.shape[0]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _whole(self, part: Part) -> torch.Tensor:
        raw = self.file.rows(part, slice(None))
        return dequantize_rows(raw, part.qtype, part.shape[-1]).reshape(part.shape)

    def _part_rows(self, part: Part, start: int, stop: int, rest: tuple[slice, ...]) -> torch.Tensor:
        if len(part.shape) != 2:
            return self._whole(part)[(slice(start, stop),) + rest].clone()
        ids = _row_ids(part)
        columns = part.shape[-1]
        step = max(1, _CHUNK_BYTES // (4 * columns))
        chunks = []
        for a in range(start, stop, step):
            b = min(stop, a + step)
            raw = self.file.rows(part, slice(a, b) if ids is None else ids[a:b])
            dense = dequantize_rows(raw, part.qtype, columns)
            chunks.append(dense[(slice(None),) + rest].contiguous() if rest else dense)
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


class GGUFBlockSource:
    """The raw rows of a one-part 2-D `TensorRef` as a `LazyWeight` source (uint8
    [rows, row_bytes], rows in transformers' order; only whole rows can be read)."""

    def __init__(self, file: GGUFFile, part: Part) -> None:
        self.file = file
        self.part = part
        self.ids = _row_ids(part)

    def __getitem__(self, index: tuple[slice, ...]) -> torch.Tensor:
        rows = index[0]
        raw = self.file.rows(self.part, rows if self.ids is None else self.ids[rows])
        return torch.from_numpy(raw)[(slice(None),) + index[1:]]


class GGUFLazyWeight(LazyWeight):
    """A reference's dense values; `gguf_blocks`: (its raw rows, ggml type) where it is
    served in its blocks, else None."""

    def __init__(self, file: GGUFFile, ref: TensorRef, name: str) -> None:
        super().__init__(GGUFTensorSource(file, ref, name), ref.shape, dtype_name=ref.dtype_name)
        self.gguf_blocks: tuple[LazyWeight, int] | None = None
        if ref.blocks:
            part = ref.parts[0]
            self.gguf_blocks = (LazyWeight(GGUFBlockSource(file, part), (part.shape[0], part.row_bytes)), part.qtype)


def gguf_weights(path: str) -> Iterator[tuple[str, LazyWeight]]:
    """(name, lazy tensor) for every reference of the converted directory `path` (none where
    it has no `GGUF_TENSORS_FILE`)."""
    manifest = read_manifest(path)
    if manifest is None:
        return
    hold_entry(path)
    file = GGUFFile(manifest["source"], manifest["fingerprint"], path)
    for name, ref in refs_of(manifest):
        yield name, GGUFLazyWeight(file, ref, name)


def has_gguf_blocks(path: str) -> bool:
    """Whether the converted directory `path` has tensors to serve in their blocks."""
    manifest: dict[str, Any] | None = read_manifest(path)
    return manifest is not None and any(entry["blocks"] for entry in manifest["tensors"].values())
