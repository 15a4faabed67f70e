"""Host <-> device copies that never make the host wait for the GPU's queue.

A plain `torch.tensor(values, device="cuda")` (or `.to("cuda")`) copies synchronously: the host
waits for every kernel already queued on the stream. With the worker launching step k+1
while step k runs (`EngineConfig.launch_ahead`), such a copy would stall the host until the
GPU has caught up, so every per-step copy goes through here: host data is staged in pinned
memory (PyTorch's caching host allocator, which keeps a block until its copy is done) and
copied without waiting; device results come back the same way behind an event.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch


def to_device(values: Sequence[Any] | torch.Tensor, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """`values` (a host list or tensor) as a tensor on `device`, queued without waiting (a
    tensor already on a GPU is only converted)."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    if isinstance(values, torch.Tensor):
        if values.device.type != "cpu" or not on_gpu:
            return values.to(device=device, dtype=dtype)
        return values.to(dtype).pin_memory().to(device, non_blocking=True)
    if not on_gpu:
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


class HostCopy:
    """Device tensors on their way to the host: copied without waiting (`done` says whether
    they are there), read once `wait` returns. On the CPU the copies are the tensors."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self._event: torch.cuda.Event | None = None
        if tensors and tensors[0].is_cuda:
            # Into pinned memory from the caching host allocator; the event marks their end.
            self.tensors = [t.to("cpu", non_blocking=True) for t in tensors]
            self._event = torch.cuda.Event(blocking=True)  # its waiters sleep instead of spinning
            self._event.record()
        else:
            self.tensors = [t.cpu() for t in tensors]

    def done(self) -> bool:
        return self._event is None or self._event.query()

    def wait(self) -> list[torch.Tensor]:
        if self._event is not None:
            self._event.synchronize()
        return self.tensors


@contextmanager
def sync_debug(mode: str | None) -> Iterator[None]:
    """torch's CUDA sync debug mode set to `mode` ("error", "warn", "default") inside; None
    leaves it as it is. It reports blocking copies, `.item()`, boolean masks and the like, not
    event waits (`EngineConfig.check_launch_syncs`)."""
    if mode is None:
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@contextmanager
def host_wait_allowed() -> Iterator[None]:
    """A wait for the GPU that the code means to make: not reported by the sync debug mode."""
    # (reading the mode would start CUDA in a process that never used it: a CPU worker)
    if not torch.cuda.is_initialized() or torch.cuda.get_sync_debug_mode() == 0:
        yield
        return
    with sync_debug("default"):
        yield
