"""Tensor parallelism: the process group of a worker rank and its collectives."""

from engine.distributed.parallel_state import (
    all_gather,
    all_reduce,
    check_tensor_parallel,
    find_free_port,
    get_tp_group,
    get_tp_rank,
    get_tp_size,
    init_tensor_parallel,
    num_local_kv_heads,
)

__all__ = [
    "all_gather",
    "all_reduce",
    "check_tensor_parallel",
    "find_free_port",
    "get_tp_group",
    "get_tp_rank",
    "get_tp_size",
    "init_tensor_parallel",
    "num_local_kv_heads",
]
