"""Engine configuration: what the user asks for (`EngineConfig`), resolved once at start-up.

"auto" values are resolved into a new frozen object with `dataclasses.replace`, never by
mutation. Environment variables are not read here: the HTTP layer's settings do that.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, TypeVar

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


T = TypeVar("T")


def setting(default: T, help_text: str) -> T:
    """A field that is also a server setting: `lightgate serve --<name>`, `LIGHTGATE_<NAME>` and
    a config file key, all documented by `help_text` (the server builds them from these fields)."""
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class EngineConfig:
    """What the engine is asked for. Fields declared with `setting` are server settings too."""

    model: str | None = setting(
        None, "HF model directory or GGUF file (default: the embedded SmolLM2-135M-Instruct)"
    )
    tokenizer: str | None = setting(None, "tokenizer directory (default: the model's)")
    dtype: str = setting(
        "auto", "weights and activations: auto (bfloat16 on GPU, float32 on CPU), float32, float16, bfloat16"
    )
    device: str = setting("auto", "auto (cuda when available), cpu or cuda")
    tensor_parallel_size: int = setting(
        1, "worker processes (GPUs) the model is split over; its attention heads must divide"
    )
    kv_cache_dtype: str = setting("auto", "KV cache: auto (the model dtype), int8 (a scale per token and head)")
    kv_cache_memory_gb: float | None = setting(
        None, "GiB for the KV pool per rank (default: 1 on CPU, gpu_memory_utilization on GPU)"
    )
    gpu_memory_utilization: float = setting(
        0.85, "GPU: fraction of the memory free after the weights used for the KV pool"
    )
    max_model_len: int | None = setting(None, "context length (default: the model's max_position_embeddings)")
    # Rows of req_to_token. On a GPU, 1024 rather than 512 gives fewer, larger steps under load
    # (docs/benchmarks.md, offline1000).
    max_num_seqs: int | None = setting(None, "sequences running at once (default: 1024 on GPU, 256 on CPU)")
    max_num_batched_tokens: int | None = setting(
        None, "tokens per engine step, prefill chunks included (default: 8192 on GPU, 512 on CPU)"
    )
    # The vision tower's work and memory of a step grow with the images it embeds: a step embeds
    # at most this many image tokens (placeholder positions), and the GPU memory profile runs the
    # tower at that bound before the KV pool is sized (engine/router/image_budget.py).
    max_image_tokens_per_step: int | None = setting(
        None,
        "vision-language models: image tokens a step may embed through the vision tower; images past it wait "
        "for a later step, one larger image runs alone (default: max_num_batched_tokens)",
    )
    max_waiting_requests: int = setting(4096, "waiting sequences before new requests are refused (429)")
    admission: Literal["conservative", "aggressive"] = setting(
        "conservative", "router admission: by max_tokens, or by observed lengths with preemption"
    )
    admission_batch: int = setting(
        1, "a full batch of 32+ decodes admits new requests only once this many rows are free"
    )
    enable_prefix_caching: bool = setting(True, "share the KV of common prompt prefixes (radix cache)")
    # Off, each step is planned after the previous one's tokens are in: the GPU waits for the
    # host between steps.
    overlap_scheduling: bool = setting(
        True, "plan the next step while the current one runs (off: new requests start a step sooner)"
    )
    # On the CPU every operation waits for itself, and a result held back for the next step's
    # launch would only come a step later: hence a GPU-only default.
    launch_ahead: bool | None = setting(
        None,
        "with overlap scheduling, launch the next step before this one's tokens reach the host "
        "(default: on a GPU)",
    )
    # GPU, for tests: launching a step raises if it makes the host wait for the GPU (a blocking
    # copy, `.item()`, a boolean mask...: torch's sync debug mode, which does not see event
    # waits). Reading prompt logprobs back is the one wait a launch may make. Not a setting.
    check_launch_syncs: bool = False
    seed: int = setting(0, "engine seed for requests without their own")
    enforce_eager: bool = setting(False, "GPU: no CUDA graphs")
    # Longer packed steps run eagerly, where the GPU, not the launches, is the bound.
    max_prefill_graph_tokens: int = setting(
        2048, "GPU: prefill steps of up to this many tokens replay CUDA graphs (0: decode graphs only)"
    )
    # The decodes' attention is still the decode kernel's.
    fuse_mixed_steps: bool = setting(
        True, "GPU: a step's decodes and prefill chunks share one pass over the weights (off: two passes)"
    )
    attention_backend: Literal["auto", "triton", "torch"] = setting(
        "auto", "layer kernels: auto (Triton on CUDA, torch elsewhere), triton or torch"
    )
    # Off until its kernels are measured against cuBLAS on the H100 (docs/benchmarks.md).
    decode_gemv: bool = setting(
        False,
        "GPU, triton backend: linear layers' products of up to 8 token rows (decode at small batches) "
        "in a CUDA-core GEMV kernel instead of cuBLAS; off until measured on the H100",
    )
    # Lossy, so opt-in.
    weight_quantization: Literal["none", "int8", "int4"] = setting(
        "none",
        "CPU: weight-only int8 (a scale per row) or int4 (groups of 32) linear layers, bfloat16 compute; lossy",
    )
    gguf_weights: Literal["quantized", "dequantized"] = setting(
        "quantized",
        "CPU: a GGUF file's linear layers, embedding and LM head in Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K "
        "or Q6_K kept in their blocks and computed by the CPU kernels, or dequantized to dtype at load (other "
        "types always are)",
    )
    # Lossy (a near-tie of the default model's answers flips), so opt-in; docs/benchmarks.md has its
    # speed where the CPU multiplies bfloat16 natively.
    gguf_prefill: Literal["float32", "bfloat16"] = setting(
        "float32",
        "CPU, GGUF blocks: the products of steps with more than 64 token rows (prefill) take the weight "
        "dequantized to this dtype and the activations rounded to it (float32 sums, rounded to it); float32 is exact "
        "up to summation order, bfloat16 faster where the CPU has bfloat16 dot products (AVX512-BF16, AMX)",
    )
    # int8 rounds each activation to 1/254 of its block's largest (products move by about 1 %):
    # auto takes it where it pays, for the K-quants, whose float32 kernels are bound by decoding;
    # the 32-value formats' are near memory speed for one row and keep their products exact.
    gguf_activations: Literal["auto", "int8", "float32"] = setting(
        "auto",
        "CPU, GGUF weights kept in blocks: decode batches (up to 64 rows) multiply int8 activations (quantized "
        "per row and block: scale max|x| / 127) in integer dot products, or the float32 activations as they are; "
        "auto: int8 for Q4_K, Q5_K and Q6_K where the CPU has AVX2 (AVX-512 VNNI, AVX-VNNI), float32 otherwise",
    )
    quantization: Literal["none", "fp8"] = setting(
        "none",
        "fp8: linear layers in FP8 (e4m3; a scale per weight row and per token), quantized from the checkpoint "
        "at load; FP8 tensor cores on Ada / Hopper GPUs, the same product in float32 elsewhere; lossy",
    )
    # A hung step kills every rank and fails the in-flight requests with EngineDeadError.
    step_timeout_s: float | None = setting(
        None,
        f"seconds one engine step may take before the workers count as hung and are killed (default "
        f"{DEFAULT_STEP_TIMEOUT_S_GPU:g} on GPU, {DEFAULT_STEP_TIMEOUT_S_CPU:g} on CPU; the first "
        f"{WARMUP_STEPS} steps get {WARMUP_TIMEOUT_FACTOR:g}x; 0: never)",
    )
    cache_dir: str | None = setting(None, "where converted GGUF models are cached (default: ~/.cache/lightgate)")

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
        for name in (
            "max_model_len", "max_num_seqs", "max_num_batched_tokens", "max_image_tokens_per_step", "max_waiting_requests"
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value!r}")
        if self.kv_cache_memory_gb is not None and not self.kv_cache_memory_gb > 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.attention_backend not in ("auto", "triton", "torch"):
            raise ValueError(f"attention_backend must be auto, triton or torch, got {self.attention_backend!r}")
        quantization = self.weight_quantization
        if quantization not in ("none", "int8", "int4"):
            raise ValueError(f"weight_quantization must be none, int8 or int4, got {quantization!r}")
        if quantization != "none" and self.dtype not in ("auto", "bfloat16", "bf16"):
            raise ValueError(f"weight_quantization {quantization} computes in bfloat16, not {self.dtype}")
        if self.gguf_weights not in ("quantized", "dequantized"):
            raise ValueError(f"gguf_weights must be quantized or dequantized, got {self.gguf_weights!r}")
        if self.gguf_prefill not in ("float32", "bfloat16"):
            raise ValueError(f"gguf_prefill must be float32 or bfloat16, got {self.gguf_prefill!r}")
        if self.gguf_activations not in ("auto", "int8", "float32"):
            raise ValueError(f"gguf_activations must be auto, int8 or float32, got {self.gguf_activations!r}")
        if self.quantization not in ("none", "fp8"):
            raise ValueError(f"quantization must be none or fp8, got {self.quantization!r}")
        if self.quantization != "none" and quantization != "none":
            raise ValueError("quantization and weight_quantization cannot be combined")
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
            max_image_tokens_per_step=self.max_image_tokens_per_step or budget,
            step_timeout_s=self.resolved_step_timeout_s() or 0.0,
        )
