"""Linear layers served in a GGUF file's quantized blocks on the CPU.

A converted GGUF directory's quantized 2-D tensors are read from the GGUF file
(`engine.models.gguf_source`), each with its raw rows in the layout the model uses.
`load_model` hands such a tensor to its parameter's weight loader as a `QuantizedRows`: a
`LazyWeight` over the dequantized tensor that also carries the blocks. A linear layer's loader (`engine.layers.linear`) gives each whole-row
region it copies to `QuantizedRows.take`, which records the region's blocks instead of
dequantizing them; every other loader reads the dequantized values as before. Once all
weights are in, `attach_gguf_weights` turns each linear layer whose rows all came as blocks
into a `GGUFWeight` (its float weight dropped: the weight parameter moves to the meta device),
and dequantizes the blocks of any layer only partly covered (the kernels' exact
dequantization, `gguf_dequantize`).

A product over more than `MAX_DIRECT_ROWS` rows (a prompt) dequantizes the weight and hands
it to torch's GEMM, in float32 or, with the `gguf_prefill` setting `bfloat16`, in bfloat16: the
blocks' values and the activations rounded to bfloat16, summed in float32, the sums rounded to
bfloat16; faster where the CPU has bfloat16 dot products, and no longer exact.

A layer fused from parts stored in different types (Q4_K_M files keep some `attn_v` and
`ffn_down` in Q6_K beside Q4_K) keeps one segment of rows per type; its product is the
segments' products side by side.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from engine.distributed.lazy_weight import LazyWeight, WeightLike
from engine.kernels.gguf_cpu import MAX_DIRECT_ROWS, gguf_dequantize, gguf_mm, gguf_mm_bf16


def prefill_dtype(name: str) -> torch.dtype:
    """The `gguf_prefill` setting's dtype."""
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"gguf_prefill must be float32 or bfloat16, got {name!r}")
    return torch.bfloat16 if name == "bfloat16" else torch.float32


@dataclass(frozen=True, slots=True)
class Segment:
    """Rows [start, start + blocks.shape[0]) of a weight, as blocks of ggml type `qtype`."""

    start: int
    qtype: int
    blocks: torch.Tensor  # uint8 [rows, bytes per row]


@dataclass(slots=True)
class BlockSink:
    """The block regions linear layers' loaders took, by the storage they were meant for."""

    # storage address -> (segment, the region of the weight it stands for)
    regions: dict[int, list[tuple[Segment, torch.Tensor]]] = field(default_factory=dict)

    def dequantize_rest(self) -> None:
        """Dequantize every recorded region into its weight (those no layer kept as blocks)."""
        for regions in self.regions.values():
            for segment, dst in regions:
                dst.copy_(gguf_dequantize(segment.blocks, segment.qtype, dst.shape[1]))
        self.regions.clear()


class QuantizedRows(LazyWeight):
    """A quantized checkpoint tensor [rows, cols]: its dequantized values (read as any
    `LazyWeight`) and its blocks [rows, bytes per row], narrowed together along the rows."""

    def __init__(self, dense: LazyWeight, blocks: LazyWeight, qtype: int, sink: BlockSink) -> None:
        super().__init__(dense._source, dense.shape, dense._starts, dense.dtype_name)
        self.dense = dense
        self.blocks = blocks
        self.qtype = qtype
        self.sink = sink

    def narrow(self, dim: int, start: int, length: int) -> LazyWeight:
        if dim % 2 == 0:
            return QuantizedRows(
                self.dense.narrow(0, start, length), self.blocks.narrow(0, start, length), self.qtype, self.sink
            )
        if start == 0 and length == self.shape[1]:
            return self
        return self.dense.narrow(dim, start, length)  # part of each row: the dequantized values

    def take(self, dst: torch.Tensor) -> bool:
        """Record the blocks for `dst` (whole rows of a 2-D float weight) instead of copying
        values into it; False (nothing recorded) where `dst` is not such a region."""
        if dst.dim() != 2 or dst.device.type != "cpu" or not dst.is_floating_point():
            return False
        row_stride = dst.stride(0)
        if dst.stride(1) != 1 or dst.shape[1] != row_stride or dst.storage_offset() % row_stride:
            return False
        if dst.shape != self.shape:
            return False
        segment = Segment(dst.storage_offset() // row_stride, self.qtype, self.blocks.read().contiguous())
        self.sink.regions.setdefault(dst.untyped_storage().data_ptr(), []).append((segment, dst))
        return True


@dataclass(frozen=True, slots=True)
class GGUFWeight:
    """A linear layer's weight [out, in] as GGUF blocks, in segments of rows; the segments of a
    type in `int8_types` multiply decode batches' activations quantized to int8 (`gguf_mm`)."""

    in_features: int
    segments: tuple[Segment, ...]
    prefill_dtype: torch.dtype = torch.float32  # of products over more than MAX_DIRECT_ROWS rows
    int8_types: frozenset[int] = frozenset()

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # x: [num_tokens, in] -> [num_tokens, out], in x's dtype
        if x.shape[0] > MAX_DIRECT_ROWS and self.prefill_dtype == torch.bfloat16:
            low = x.to(torch.bfloat16)
            parts = [gguf_mm_bf16(low, s.blocks, s.qtype) for s in self.segments]
        else:
            x32 = x if x.dtype == torch.float32 else x.float()
            parts = [gguf_mm(x32, s.blocks, s.qtype, s.qtype in self.int8_types) for s in self.segments]
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        if bias is not None:
            out = out.add_(bias)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` [T] of the weight, dequantized: float32 [T, in] (an embedding lookup)."""
        ids = ids.reshape(-1)
        if len(self.segments) == 1:
            segment = self.segments[0]
            return gguf_dequantize(segment.blocks.index_select(0, ids - segment.start), segment.qtype, self.in_features)
        out = torch.empty(ids.shape[0], self.in_features)
        for segment in self.segments:
            local = ids - segment.start
            hit = ((local >= 0) & (local < segment.blocks.shape[0])).nonzero().squeeze(1)
            picked = segment.blocks.index_select(0, local.index_select(0, hit))
            out.index_copy_(0, hit, gguf_dequantize(picked, segment.qtype, self.in_features))
        return out

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [out, in] (exactly gguf's dequantization)."""
        return torch.cat([gguf_dequantize(s.blocks, s.qtype, self.in_features) for s in self.segments])


def _merged(segments: list[Segment]) -> tuple[Segment, ...]:
    """Adjacent segments of one type joined (a fused q | k | v of one type: one product)."""
    merged: list[Segment] = []
    for segment in sorted(segments, key=lambda s: s.start):
        last = merged[-1] if merged else None
        if last is not None and last.qtype == segment.qtype and last.start + last.blocks.shape[0] == segment.start:
            merged[-1] = Segment(last.start, last.qtype, torch.cat((last.blocks, segment.blocks)))
        else:
            merged.append(segment)
    return tuple(merged)


def _covers(segments: list[Segment], rows: int) -> bool:
    """Whether the segments tile rows [0, rows) exactly."""
    end = 0
    for segment in sorted(segments, key=lambda s: s.start):
        if segment.start != end:
            return False
        end += segment.blocks.shape[0]
    return end == rows


def _weight_owners(model: nn.Module) -> dict[int, list[nn.Module]]:
    """Modules that can serve blocks (a `packed_weight` slot: linear layers and the LM head; a
    `gguf_weight` slot: the embedding), by their weight's storage (a tied head shares it)."""
    owners: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        weight = module._parameters.get("weight")
        if weight is None or weight.dim() != 2 or weight.device.type != "cpu":
            continue
        if hasattr(module, "packed_weight") or hasattr(module, "gguf_weight"):
            owners.setdefault(weight.untyped_storage().data_ptr(), []).append(module)
    return owners


def attach_gguf_weights(
    model: nn.Module, sink: BlockSink, prefill: torch.dtype = torch.float32, int8_types: frozenset[int] = frozenset()
) -> int:
    """Give each layer whose weight rows all came as blocks its `GGUFWeight` (products over
    more than `MAX_DIRECT_ROWS` rows in `prefill`, see the module docstring; decode batches'
    with int8 activations for the types in `int8_types`; as `packed_weight`, or `gguf_weight`
    for an embedding; the blocks also registered as buffers) and drop its float weight;
    dequantize the blocks of every other region taken. Returns how many weights kept blocks."""
    count = 0
    for address, modules in _weight_owners(model).items():
        segments = [segment for segment, _ in sink.regions.get(address, [])]
        weight = modules[0]._parameters["weight"]
        assert weight is not None
        rows, cols = weight.shape
        if not segments or not _covers(segments, rows):
            continue  # a fused layer with a part stored unquantized: dense (dequantize_rest)
        del sink.regions[address]
        packed = GGUFWeight(cols, _merged(segments), prefill, int8_types)
        for module in modules:
            for i, segment in enumerate(packed.segments):
                module.register_buffer(f"gguf_blocks{i}", segment.blocks, persistent=False)
            slot = "packed_weight" if hasattr(module, "packed_weight") else "gguf_weight"
            setattr(module, slot, packed)
            module.weight = nn.Parameter(torch.empty(rows, cols, dtype=weight.dtype, device="meta"), requires_grad=False)
        count += 1
    sink.dequantize_rest()
    return count


def with_gguf_blocks(weights: Iterable[tuple[str, WeightLike]], sink: BlockSink) -> Iterator[tuple[str, WeightLike]]:
    """`weights`, each one that carries blocks (`gguf_blocks`: its raw rows and ggml type, as
    `engine.models.gguf_source` yields them) as a `QuantizedRows` recording into `sink`."""
    for name, weight in weights:
        blocks: tuple[LazyWeight, int] | None = getattr(weight, "gguf_blocks", None)
        if blocks is not None and isinstance(weight, LazyWeight):
            yield name, QuantizedRows(weight, blocks[0], blocks[1], sink)
        else:
            yield name, weight
