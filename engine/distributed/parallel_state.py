"""The tensor-parallel process group of a worker, and the two collectives the layers need.

Each worker process of a `tensor_parallel_size=N` engine is one rank of one group: gloo on
CPU, NCCL on CUDA. Without an initialised group (tp=1, or a single-process test that builds
the shards of several ranks by hand) the rank is 0, the size is 1 and `all_reduce` /
`all_gather` return their input unchanged, so tp=1 never touches torch.distributed.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import torch
import torch.distributed as dist

from engine.model_config import ModelConfig

_group: dist.ProcessGroup | None = None
_rank = 0
_size = 1


def find_free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def init_tensor_parallel(rank: int, world_size: int, port: int, device: str) -> None:
    """Join the group of `world_size` ranks that rendezvous on 127.0.0.1:`port`."""
    global _group, _rank, _size
    if world_size == 1:
        return
    backend = backend_for(device)
    if backend == "nccl":
        os.environ["NCCL_NVLS_ENABLE"] = "0"  # never NVLink multicast
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
    )
    _group = dist.group.WORLD
    _rank, _size = rank, world_size


def get_tp_rank() -> int:
    return _rank


def get_tp_size() -> int:
    return _size


def get_tp_group() -> dist.ProcessGroup | None:
    return _group


def all_reduce(x: torch.Tensor, op: Any = None) -> torch.Tensor:
    """Sum (or `op`) of `x` over the ranks, in place; `x` itself when there is no group."""
    if _group is None:
        return x
    dist.all_reduce(x, op=op if op is not None else dist.ReduceOp.SUM, group=_group)
    return x


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """[..., d] on each rank -> [..., d * tp], rank r's part at [r * d, (r + 1) * d)."""
    if _group is None:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(_size)]
    dist.all_gather(parts, x, group=_group)
    return torch.cat(parts, dim=-1)


def all_reduce_min_int(value: int) -> int:
    """The smallest of the ranks' `value`s (so that every rank sizes its pools the same)."""
    if _group is None:
        return value
    device = "cuda" if dist.get_backend(_group) == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.int64, device=device)
    all_reduce(t, dist.ReduceOp.MIN)
    return int(t.item())


def num_local_kv_heads(total_num_kv_heads: int, tp_size: int) -> int:
    """KV heads one rank holds: KV / tp, or 1 (replicated) when there are fewer than ranks."""
    return 1 if tp_size >= total_num_kv_heads else total_num_kv_heads // tp_size


def check_tensor_parallel(shape: ModelConfig, tp_size: int, device: str) -> None:
    """Raise ValueError, naming the field, when the model cannot be split over `tp_size` ranks."""
    if tp_size == 1:
        return
    heads, kv_heads, vocab = shape.num_heads, shape.num_kv_heads, shape.vocab_size
    problems = []
    if heads % tp_size:
        problems.append(f"num_attention_heads={heads} is not divisible by tensor_parallel_size={tp_size}")
    if kv_heads >= tp_size and kv_heads % tp_size:
        problems.append(f"num_key_value_heads={kv_heads} is not divisible by tensor_parallel_size={tp_size}")
    if kv_heads < tp_size and tp_size % kv_heads:
        problems.append(
            f"tensor_parallel_size={tp_size} is not a multiple of num_key_value_heads={kv_heads} "
            "(KV heads are replicated when there are fewer of them than ranks)"
        )
    if shape.intermediate_size % tp_size:
        problems.append(
            f"intermediate_size={shape.intermediate_size} is not divisible by tensor_parallel_size={tp_size}"
        )
    for name, size in shape.expert_sizes:
        if size % tp_size:
            problems.append(f"{name}={size} is not divisible by tensor_parallel_size={tp_size}")
    if vocab < tp_size:
        problems.append(f"vocab_size={vocab} is smaller than tensor_parallel_size={tp_size}")
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() < tp_size:
        problems.append(f"tensor_parallel_size={tp_size} needs {tp_size} GPUs, found {torch.cuda.device_count()}")
    if problems:
        raise ValueError("this model cannot be split over the ranks: " + "; ".join(problems))
