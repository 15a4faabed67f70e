"""Engine configuration: what the user asks for (`EngineConfig`), resolved once at start-up.

"auto" values are resolved into a new frozen object with `dataclasses.replace`, never by
mutation. Environment variables are not read here: the HTTP layer's settings do that.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # HF directory, GGUF file, or None for the embedded default
    tokenizer: str | None = None  # defaults to the model's own tokenizer files
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    device: str = "auto"  # auto: cuda when available
    tensor_parallel_size: int = 1  # worker ranks the model is split over (heads must divide)
    kv_cache_dtype: str = "auto"  # auto: the model dtype; "int8"
    kv_cache_memory_gb: float | None = None  # KV pool size per rank; default: 1 GiB on CPU, a fraction of free memory on GPU
    gpu_memory_utilization: float = 0.85  # GPU: fraction of free memory (after weights) for KV
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_num_seqs: int = 256  # cap on running sequences (rows of req_to_token)
    max_num_batched_tokens: int | None = None  # per-step token budget (chunked prefill)
    max_waiting_requests: int = 4096  # beyond this, generate() raises EngineOverloadedError
    admission: Literal["conservative", "aggressive"] = "conservative"
    enable_prefix_caching: bool = True
    seed: int = 0
    enforce_eager: bool = False  # GPU: no CUDA graphs
    attention_backend: Literal["auto", "triton", "torch"] = "auto"  # auto: Triton kernels on CUDA

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be at least 1")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.kv_cache_dtype not in ("auto", "int8", *_DTYPES):
            raise ValueError(f"kv_cache_dtype must be auto, int8 or a float dtype, got {self.kv_cache_dtype!r}")
        if self.admission not in ("conservative", "aggressive"):
            raise ValueError(f"admission must be conservative or aggressive, got {self.admission!r}")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be at least 1")

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.resolved_device().startswith("cuda") else torch.float32
        return _DTYPES[self.dtype]

    def kv_torch_dtype(self) -> torch.dtype:
        if self.kv_cache_dtype == "auto":
            return self.torch_dtype()
        if self.kv_cache_dtype == "int8":
            return torch.int8
        return _DTYPES[self.kv_cache_dtype]

    def resolve(self, *, max_position_embeddings: int) -> EngineConfig:
        """Fill in the values that depend on the model; returns a new frozen config."""
        max_model_len = self.max_model_len or max_position_embeddings
        budget = self.max_num_batched_tokens
        if budget is None:
            budget = 8192 if self.resolved_device().startswith("cuda") else 512
        return dataclasses.replace(
            self,
            device=self.resolved_device(),
            max_model_len=max_model_len,
            max_num_batched_tokens=budget,
        )
