"""Linear layers with tensor-parallel names and per-parameter weight loaders.

Every parameter carries a `weight_loader(param, loaded_weight, shard_id=None)` that copies the
slice of a full checkpoint tensor that belongs to this rank. `loaded_weight` is a `LazyWeight`
(`engine.distributed`) when it comes from a checkpoint: the loader narrows it to this rank's
rows or columns before reading, so a rank reads only its shard from disk. A plain tensor works
too. With `tp_size == 1` each rank owns the whole tensor. A column layer's output stays sharded (the next row layer consumes
the shard); a row layer sums its partial outputs over the ranks with an all-reduce
(`engine.distributed`; a no-op in a process without a tensor-parallel group).

Weights are `[output_size, input_size]` as in `torch.nn.Linear`:
- ColumnParallelLinear shards dim 0 (outputs), RowParallelLinear shards dim 1 (inputs).
- MergedColumnParallelLinear stacks several column layers (gate | up) along dim 0.
- QKVParallelLinear stacks q | k | v heads along dim 0; kv heads are replicated when there
  are fewer kv heads than ranks.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.distributed import WeightLike, all_reduce, read_weight
from engine.layers import cpu_gemm
from engine.layers.backend import use_decode_gemv
from engine.layers.fp8 import FP8_DTYPE, fp8_linear
from engine.layers.gguf_linear import GGUFWeight, QuantizedRows


def _divide(numerator: int, denominator: int) -> int:
    if numerator % denominator:
        raise ValueError(f"{numerator} is not divisible by {denominator}")
    return numerator // denominator


def _new_param(*shape: int, dtype: torch.dtype | None) -> nn.Parameter:
    # Uninitialised on purpose: every parameter is overwritten by its weight_loader.
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class LinearBase(nn.Module):
    """y = x @ W.T (+ b). Subclasses decide the shape of W on this rank and how to load it."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool,
        tp_rank: int = 0,
        tp_size: int = 1,
        params_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.input_size = input_size  # on this rank
        self.output_size = output_size  # on this rank
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        self.weight = _new_param(output_size, input_size, dtype=params_dtype)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        self.bias: nn.Parameter | None = None
        if bias:
            self.bias = _new_param(output_size, dtype=params_dtype)
            self.bias.weight_loader = self.weight_loader  # type: ignore[attr-defined]

        # CPU layout, see cpu_gemm; GGUF blocks: engine.layers.gguf_linear
        self.packed_weight: torch.Tensor | cpu_gemm.QuantizedWeight | GGUFWeight | None = None
        self.weight_scale: torch.Tensor  # [out, 1] float32, set with an e4m3 weight (engine.layers.fp8)

    def weight_loader(self, param: nn.Parameter, loaded_weight: WeightLike) -> None:
        _copy(param.data, loaded_weight)

    def _product(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.weight.dtype == FP8_DTYPE:  # quantized after loading (--quantization fp8)
            return fp8_linear(x, self.weight, self.weight_scale, bias)
        if x.is_cuda and x.dim() == 2 and use_decode_gemv(x.shape[0]) and x.dtype == self.weight.dtype:
            from engine.kernels.gemv import gemv  # Triton only where a GPU is

            return gemv(x if x.stride(-1) == 1 else x.contiguous(), self.weight, bias)
        return cpu_gemm.linear(x, self.weight, bias, self.packed_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, input_size] -> [num_tokens, output_size]
        return self._product(x, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in={self.input_size}, out={self.output_size}, bias={self.bias is not None}, tp={self.tp_size}"
        )


def _copy(dst: torch.Tensor, src: WeightLike) -> None:
    """Check the shape, then read `src` (only its region, for a LazyWeight) into `dst`; GGUF
    blocks for whole weight rows are recorded instead (`QuantizedRows.take`)."""
    if dst.shape != src.shape:
        raise ValueError(
            f"weight shape mismatch: parameter {tuple(dst.shape)}, checkpoint {tuple(src.shape)}"
        )
    if isinstance(src, QuantizedRows) and src.take(dst):
        return
    dst.copy_(read_weight(src))


def _check_full_size(loaded_weight: WeightLike, dim: int, expected: int, what: str) -> None:
    """The checkpoint tensor must be the whole (unsharded) size along the dim that is split."""
    if loaded_weight.shape[dim] != expected:
        raise ValueError(
            f"weight shape mismatch: {what} needs {expected} along dim {dim}, "
            f"checkpoint {tuple(loaded_weight.shape)}"
        )


class ReplicatedLinear(LinearBase):
    """Every rank holds the full weight."""


class ColumnParallelLinear(LinearBase):
    """Outputs are split across ranks: rank r holds rows [r * out/tp, (r + 1) * out/tp)."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        tp_rank: int = 0,
        tp_size: int = 1,
        params_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(input_size, _divide(output_size, tp_size), bias, tp_rank, tp_size, params_dtype)

    def weight_loader(self, param: nn.Parameter, loaded_weight: WeightLike) -> None:
        shard = param.data.shape[0]
        _check_full_size(loaded_weight, 0, shard * self.tp_size, "a column-parallel layer")
        _copy(param.data, loaded_weight.narrow(0, self.tp_rank * shard, shard))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column layers fused along the output dim (e.g. gate_proj | up_proj)."""

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        bias: bool = False,
        tp_rank: int = 0,
        tp_size: int = 1,
        params_dtype: torch.dtype | None = None,
    ) -> None:
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias, tp_rank, tp_size, params_dtype)

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: WeightLike, shard_id: int | None = None
    ) -> None:
        if shard_id is None:  # a checkpoint that fuses the parts too (Phi-3's gate_up_proj)
            _check_full_size(loaded_weight, 0, sum(self.output_sizes), "the fused parts")
            start = 0
            for part, size in enumerate(self.output_sizes):
                self.weight_loader(param, loaded_weight.narrow(0, start, size), part)
                start += size
            return
        # Each part is split on its own, so rank r holds [gate_r | up_r].
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        size = self.output_sizes[shard_id] // self.tp_size
        _check_full_size(loaded_weight, 0, self.output_sizes[shard_id], f"part {shard_id}")
        rank_part = loaded_weight.narrow(0, self.tp_rank * size, size)
        _copy(param.data.narrow(0, offset, size), rank_part)


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q | k | v projection; `forward` output is [T, (H + 2 * KV) * D] on this rank."""

    def __init__(
        self,
        hidden_size: int,
        head_size: int,
        total_num_heads: int,
        total_num_kv_heads: int | None = None,
        bias: bool = False,
        tp_rank: int = 0,
        tp_size: int = 1,
        params_dtype: torch.dtype | None = None,
    ) -> None:
        total_num_kv_heads = total_num_kv_heads or total_num_heads
        self.head_size = head_size
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads
        self.num_heads = _divide(total_num_heads, tp_size)
        if tp_size >= total_num_kv_heads:
            # Fewer kv heads than ranks: each kv head is replicated on tp / KV ranks.
            self.num_kv_heads = 1
            self.num_kv_head_replicas = _divide(tp_size, total_num_kv_heads)
        else:
            self.num_kv_heads = _divide(total_num_kv_heads, tp_size)
            self.num_kv_head_replicas = 1
        output_size = (self.num_heads + 2 * self.num_kv_heads) * head_size * tp_size
        super().__init__(hidden_size, output_size, bias, tp_rank, tp_size, params_dtype)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_size

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_size

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: WeightLike, shard_id: str | None = None
    ) -> None:
        if shard_id is None:  # a checkpoint that fuses q | k | v too (Phi-3's qkv_proj)
            q_rows = self.total_num_heads * self.head_size
            kv_rows = self.total_num_kv_heads * self.head_size
            _check_full_size(loaded_weight, 0, q_rows + 2 * kv_rows, "the fused q, k and v")
            self.weight_loader(param, loaded_weight.narrow(0, 0, q_rows), "q")
            self.weight_loader(param, loaded_weight.narrow(0, q_rows, kv_rows), "k")
            self.weight_loader(param, loaded_weight.narrow(0, q_rows + kv_rows, kv_rows), "v")
            return
        # A replicated kv head (fewer kv heads than ranks) is read by each of its tp / KV ranks.
        if shard_id == "q":
            offset, size, rank_idx = 0, self.q_size, self.tp_rank
            total_heads = self.total_num_heads
        elif shard_id == "k":
            offset, size = self.q_size, self.kv_size
            rank_idx = self.tp_rank // self.num_kv_head_replicas
            total_heads = self.total_num_kv_heads
        elif shard_id == "v":
            offset, size = self.q_size + self.kv_size, self.kv_size
            rank_idx = self.tp_rank // self.num_kv_head_replicas
            total_heads = self.total_num_kv_heads
        else:
            raise ValueError(f"shard_id must be q, k or v, got {shard_id!r}")
        _check_full_size(loaded_weight, 0, total_heads * self.head_size, f"{shard_id}_proj")
        rank_part = loaded_weight.narrow(0, rank_idx * size, size)
        _copy(param.data.narrow(0, offset, size), rank_part)


class RowParallelLinear(LinearBase):
    """Inputs are split across ranks; the partial outputs are summed by an all-reduce
    (`reduce_results=False`: left to the caller, who sums it with other partial sums first).

    The bias is added on rank 0 only so that the all-reduce counts it once.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        tp_rank: int = 0,
        tp_size: int = 1,
        params_dtype: torch.dtype | None = None,
        reduce_results: bool = True,
    ) -> None:
        super().__init__(_divide(input_size, tp_size), output_size, bias, tp_rank, tp_size, params_dtype)
        self.reduce_results = reduce_results

    def weight_loader(self, param: nn.Parameter, loaded_weight: WeightLike) -> None:
        if param.data.dim() == 1:  # bias: not sharded
            _copy(param.data, loaded_weight)
            return
        shard = param.data.shape[1]
        _check_full_size(loaded_weight, 1, shard * self.tp_size, "a row-parallel layer")
        _copy(param.data, loaded_weight.narrow(1, self.tp_rank * shard, shard))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, input_size / tp] -> [num_tokens, output_size], summed over the ranks
        bias = self.bias if self.tp_rank == 0 else None
        out = self._product(x, bias)
        return all_reduce(out) if self.tp_size > 1 and self.reduce_results else out
