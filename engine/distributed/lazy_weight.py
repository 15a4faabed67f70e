"""A checkpoint tensor that is read from disk only where a rank's shard lies.

The loader hands each parameter's `weight_loader` a `LazyWeight`: its `shape` comes from the
file header, `narrow(dim, start, length)` narrows the region to read without reading
anything, and `read()` reads that region alone (safetensors' `get_slice`: a strided copy out
of the memory-mapped file, so only the shard's rows or columns are materialised). Weight
loaders narrow to their rank's shard first and read last; a tensor that no parameter wants
is never read at all.

`read_weight` also takes a plain `torch.Tensor` (tests and callers that already hold the whole
tensor), whose `shape` and `narrow` are the same API.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class _Sliceable(Protocol):
    """What `LazyWeight` needs of its source: safetensors' PySafeSlice, or a tensor."""

    def __getitem__(self, index: Any) -> torch.Tensor: ...


class LazyWeight:
    """A region of a tensor in a checkpoint file, read only when `read()` is called."""

    def __init__(
        self, source: _Sliceable, shape: Any, starts: tuple[int, ...] | None = None, dtype_name: str | None = None
    ) -> None:
        self._source = source
        self.shape = torch.Size(shape)  # of the region, not of the whole checkpoint tensor
        self._starts = starts if starts is not None else (0,) * len(self.shape)
        self.dtype_name = dtype_name  # the file's name for its dtype (safetensors: "BF16", "F8_E4M3", ...)

    def dim(self) -> int:
        return len(self.shape)

    def narrow(self, dim: int, start: int, length: int) -> LazyWeight:
        """The sub-region `[start, start + length)` along `dim` (like `torch.Tensor.narrow`)."""
        ndim = len(self.shape)
        if not -ndim <= dim < ndim:
            raise ValueError(f"dim {dim} out of range for a checkpoint tensor of shape {tuple(self.shape)}")
        dim %= ndim
        if start < 0 or length < 0 or start + length > self.shape[dim]:
            raise ValueError(
                f"cannot take [{start}, {start + length}) along dim {dim} of a checkpoint tensor "
                f"of shape {tuple(self.shape)}"
            )
        shape = list(self.shape)
        shape[dim] = length
        starts = list(self._starts)
        starts[dim] += start
        return LazyWeight(self._source, shape, tuple(starts), self.dtype_name)

    def read(self) -> torch.Tensor:
        """Read this region from the file (a new CPU tensor in the checkpoint's dtype)."""
        index = tuple(slice(s, s + n) for s, n in zip(self._starts, self.shape, strict=True))
        return self._source[index]

    def __repr__(self) -> str:
        return f"LazyWeight(shape={tuple(self.shape)}, starts={self._starts})"


WeightLike = torch.Tensor | LazyWeight


def read_weight(weight: WeightLike) -> torch.Tensor:
    """`weight` itself if it is a tensor, else its region read from the checkpoint."""
    return weight.read() if isinstance(weight, LazyWeight) else weight
