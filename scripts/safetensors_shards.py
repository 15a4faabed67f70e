"""The sharded safetensors writer of the random-weight model makers (`make_random_*.py`).

Tensors are written in the order given, as bf16, into `model-0000N.safetensors` files of about
`shard_bytes` each (a file closes once it reaches that size), with the
`model.safetensors.index.json` that maps every name to its file, as released checkpoints are laid
out. The makers import it as a sibling module, whether run as scripts or loaded by file path.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import torch

SHARD_BYTES = 2 << 30


def random_bf16(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """N(0, 0.02) drawn on the generator's device, returned as bf16 on the CPU."""
    return (torch.randn(shape, generator=generator, device=generator.device) * 0.02).to(torch.bfloat16).cpu()


def default_generator(seed: int) -> torch.Generator:
    """A seeded generator on the GPU when there is one: drawing billions of values on a CPU takes minutes."""
    return torch.Generator(device="cuda" if torch.cuda.is_available() else "cpu").manual_seed(seed)


def write_shards(out: str, tensors: Iterable[tuple[str, torch.Tensor]], shard_bytes: int = SHARD_BYTES) -> int:
    """Write `tensors` (name, tensor) as bf16 safetensors shards plus their index into `out` -> their bytes."""
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    num_files = size = total = 0

    def flush() -> None:
        nonlocal num_files
        num_files += 1
        name = f"model-{num_files:05d}.safetensors"
        save_file(shard, os.path.join(out, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard.clear()

    for name, tensor in tensors:
        shard[name] = tensor.to(torch.bfloat16)
        size += tensor.numel() * 2
        total += tensor.numel() * 2
        if size >= shard_bytes:
            flush()
            size = 0
    if shard:
        flush()
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    return total
