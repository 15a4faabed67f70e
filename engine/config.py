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


# A step is bounded by max_num_batched_tokens (8192 on GPU: well under 5 s even for a 70B model),
# so 60 s on GPU is over 10x any healthy step, kernel compilation included. On CPU a 512-token
# prefill chunk of a multi-billion-parameter model can legitimately take a minute or more on a
# few cores, so the default is 300 s there (vLLM's and SGLang's watchdogs also default to 300 s).
DEFAULT_STEP_TIMEOUT_S_GPU = 60.0
DEFAULT_STEP_TIMEOUT_S_CPU = 300.0
# The first steps compile Triton kernels (and may capture CUDA graphs): they get longer.
WARMUP_STEPS = 4
WARMUP_TIMEOUT_FACTOR = 5.0


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # HF directory, GGUF file, or None for the embedded default
    tokenizer: str | None = None  # defaults to the model's own tokenizer files
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU (bf16 with weight_quantization)
    device: str = "auto"  # auto: cuda when available
    tensor_parallel_size: int = 1  # worker ranks the model is split over (heads must divide)
    kv_cache_dtype: str = "auto"  # auto: the model dtype; "int8"
    kv_cache_memory_gb: float | None = None  # KV pool size per rank; default: 1 GiB on CPU, a fraction of free memory on GPU
    gpu_memory_utilization: float = 0.85  # GPU: fraction of free memory (after weights) for KV
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    # Cap on running sequences (rows of req_to_token). None: 1024 on GPU (offline1000 on an
    # H200 gave 9 768 and 9 811 output tok/s at 1024 against 9 316 at 512: fewer, larger
    # steps; docs/benchmarks.md), 256 on CPU.
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None  # per-step token budget (chunked prefill)
    max_waiting_requests: int = 4096  # beyond this, generate() raises EngineOverloadedError
    admission: Literal["conservative", "aggressive"] = "conservative"
    admission_batch: int = 1  # a full batch of >= 32 decodes admits only once this many rows are free
    enable_prefix_caching: bool = True
    # Plan and send step k+1 while step k runs (the host's scheduling and output processing hide
    # behind the GPU). Off: each step is planned after the previous one's tokens are in, so a
    # request that arrives mid-step starts one step sooner, and the GPU waits for the host
    # between steps.
    overlap_scheduling: bool = True
    # With overlap_scheduling, the worker also launches step k+1 before step k's tokens reach
    # the host, so reading the plan and preparing the inputs hide behind the GPU too. None: on a
    # GPU only (on the CPU every operation waits for itself, and a result held back for the next
    # step's launch would only come a step later).
    launch_ahead: bool | None = None
    # GPU, for tests: launching a step raises if it makes the host wait for the GPU (a blocking
    # copy, `.item()`, a boolean mask...: torch's sync debug mode, which does not see event
    # waits). Reading prompt logprobs back is the one wait a launch may make.
    check_launch_syncs: bool = False
    seed: int = 0
    enforce_eager: bool = False  # GPU: no CUDA graphs
    # GPU: packed steps (prefill chunks) of up to this many tokens replay a CUDA graph too
    # (token-count buckets); longer ones run eagerly, where the GPU, not the launches, is the
    # bound. 0: decode graphs only.
    max_prefill_graph_tokens: int = 2048
    # GPU with CUDA graphs: a step with prefill chunks runs its decodes in the same pass over the
    # weights (one GEMM per layer over all its tokens; the decodes' attention is still the decode
    # kernel's). Off: the decodes replay a decode graph and the rest runs as a second pass.
    fuse_mixed_steps: bool = True
    attention_backend: Literal["auto", "triton", "torch"] = "auto"  # auto: Triton kernels on CUDA
    # CPU: weight-only quantization of the linear layers (lossy, so opt-in), computing in
    # bfloat16: int8 (a scale per output row) or int4 (a scale and a zero per 32 inputs).
    weight_quantization: Literal["none", "int8", "int4"] = "none"
    # Seconds one step may take before the workers count as hung: every rank is killed and the
    # in-flight requests fail with EngineDeadError. None: 60 on GPU, 300 on CPU; 0: never.
    # The first WARMUP_STEPS steps get WARMUP_TIMEOUT_FACTOR times as long (kernel compilation).
    step_timeout_s: float | None = None

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be at least 1")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.kv_cache_dtype not in ("auto", "int8", *_DTYPES):
            raise ValueError(f"kv_cache_dtype must be auto, int8 or a float dtype, got {self.kv_cache_dtype!r}")
        if self.admission_batch < 1:
            raise ValueError("admission_batch must be at least 1")
        if self.admission not in ("conservative", "aggressive"):
            raise ValueError(f"admission must be conservative or aggressive, got {self.admission!r}")
        if self.max_prefill_graph_tokens < 0:
            raise ValueError("max_prefill_graph_tokens must be >= 0 (0: no prefill graphs)")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be at least 1")
        quantization = self.weight_quantization
        if quantization not in ("none", "int8", "int4"):
            raise ValueError(f"weight_quantization must be none, int8 or int4, got {quantization!r}")
        if quantization != "none" and self.dtype not in ("auto", "bfloat16", "bf16"):
            raise ValueError(f"weight_quantization {quantization} computes in bfloat16, not {self.dtype}")
        if self.step_timeout_s is not None and not self.step_timeout_s >= 0:
            raise ValueError(f"step_timeout_s must be >= 0 (0: no timeout), got {self.step_timeout_s!r}")

    def resolved_step_timeout_s(self) -> float | None:
        """The step timeout in seconds, or None for no timeout (`step_timeout_s=0`)."""
        if self.step_timeout_s is None:
            on_gpu = self.resolved_device().startswith("cuda")
            return DEFAULT_STEP_TIMEOUT_S_GPU if on_gpu else DEFAULT_STEP_TIMEOUT_S_CPU
        return self.step_timeout_s or None

    def resolved_launch_ahead(self) -> bool:
        if not self.overlap_scheduling:
            return False
        return self.resolved_device().startswith("cuda") if self.launch_ahead is None else self.launch_ahead

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            on_gpu = self.resolved_device().startswith("cuda")
            return torch.bfloat16 if on_gpu or self.weight_quantization != "none" else torch.float32
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
        on_gpu = self.resolved_device().startswith("cuda")
        budget = self.max_num_batched_tokens
        if budget is None:
            budget = 8192 if on_gpu else 512
        max_num_seqs = self.max_num_seqs
        if max_num_seqs is None:
            max_num_seqs = 1024 if on_gpu else 256
        return dataclasses.replace(
            self,
            device=self.resolved_device(),
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=budget,
            step_timeout_s=self.resolved_step_timeout_s() or 0.0,
        )
