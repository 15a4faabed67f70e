"""Tensor parallelism: the process group of a worker rank, its collectives, and reading a
rank's shard of a checkpoint tensor (`LazyWeight`)."""

from engine.distributed.lazy_weight import LazyWeight, WeightLike, read_weight
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
    "LazyWeight",
    "WeightLike",
    "all_gather",
    "all_reduce",
    "check_tensor_parallel",
    "find_free_port",
    "get_tp_group",
    "get_tp_rank",
    "get_tp_size",
    "init_tensor_parallel",
    "num_local_kv_heads",
    "read_weight",
]
