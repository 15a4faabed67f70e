"""Server settings: `LIGHTGATE_*` environment variables and `.env`, overridden by CLI flags.

This is the one place where the server reads its environment. `Settings` is resolved once
at start-up and frozen; `engine_config()` maps it onto the engine's `EngineConfig`.
Every field becomes a flag of `lightgate serve` (`--max-num-seqs 64`), see `add_cli_flags`.
"""

from __future__ import annotations

import argparse
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from engine import EngineConfig

# Comma-separated in the environment and on the command line ("a,b"); JSON lists also work;
# "none" is the empty list.
CommaList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LIGHTGATE_",
        env_file=".env",
        env_ignore_empty=True,  # `LIGHTGATE_MODEL=` means "the default", not an empty path
        extra="ignore",
        frozen=True,
        protected_namespaces=(),
    )

    # -- HTTP ------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    served_model_name: str | None = Field(
        None, description="the name clients send as `model` (default: the model directory's name)"
    )
    model_aliases: CommaList = Field(default_factory=list, description="more accepted model names, comma-separated")
    api_keys: CommaList = Field(
        default_factory=list, description="accepted bearer tokens, comma-separated; empty: no authentication"
    )
    cors_allow_origins: CommaList = Field(
        default_factory=lambda: ["*"], description="CORS origins, comma-separated; none: CORS off"
    )
    cors_allow_headers: CommaList = Field(
        default_factory=lambda: ["*"], description="request headers allowed cross-origin (* covers Authorization, X-Stainless-*)"
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After seconds sent with 429 when the queue is full")
    # vLLM sets no limit. 64 MiB is far beyond any real request: a full 128k-token context is about
    # 1 MB of JSON as token ids ("12345, " a token) and 0.5 to 3 MB as text, so a batch of dozens of
    # such prompts still fits; yet a body is held whole in memory and parsed into Python objects
    # several times its size, so one request cannot take gigabytes.
    max_request_body_bytes: int = Field(
        64 * 1024 * 1024, ge=0, description="largest request body in bytes, refused with 413 beyond (0: no limit)"
    )
    trust_request_chat_template: bool = Field(
        False, description="accept chat_template_kwargs.chat_template (a request's own Jinja template runs on the server)"
    )
    shutdown_timeout: float = Field(
        30.0, ge=0, description="seconds running requests may take to finish after SIGTERM"
    )
    tool_call_parser: Literal["auto", "hermes", "llama3_json", "mistral"] = Field(
        "auto", description="the format of tool calls in the model's text: auto (from the chat template), hermes, "
        "llama3_json or mistral"
    )
    reasoning_parser: Literal["auto", "think", "none"] = Field(
        "auto", description="thinking split off as reasoning_content: auto (from the chat template), think "
        "(<think>...</think>) or none"
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="log level")
    access_log: bool = Field(True, description="log one line per HTTP request")

    # -- engine ------------------------------------------------------------------------------
    model: str | None = Field(None, description="HF model directory or GGUF file (default: embedded SmolLM2-135M-Instruct)")
    tokenizer: str | None = Field(None, description="tokenizer directory (default: the model's)")
    dtype: str = Field("auto", description="weights and activations: auto, float32, float16, bfloat16")
    device: str = Field("auto", description="auto, cpu or cuda")
    kv_cache_dtype: str = Field("auto", description="auto (the model dtype) or int8")
    weight_quantization: Literal["none", "int8", "int4"] = Field(
        "none",
        description="CPU: weight-only int8 (per row) or int4 (groups of 32) linear layers, bfloat16 compute; lossy",
    )
    kv_cache_memory_gb: float | None = Field(
        None, gt=0, description="GiB for the KV pool (default: 1 on CPU, gpu_memory_utilization on GPU)"
    )
    gpu_memory_utilization: float = Field(
        0.85, gt=0, le=1, description="GPU: fraction of free memory after the weights used for the KV pool"
    )
    max_model_len: int | None = Field(None, ge=1, description="context length (default: the model's)")
    max_num_seqs: int | None = Field(None, ge=1, description="sequences running at once (default: 1024 on GPU, 256 on CPU)")
    max_num_batched_tokens: int | None = Field(
        None, ge=1, description="tokens per engine step (default 8192 on GPU, 512 on CPU)"
    )
    max_waiting_requests: int = Field(4096, ge=1, description="waiting requests before 429")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs the model is split over")
    admission: Literal["conservative", "aggressive"] = Field(
        "conservative", description="router admission: by max_tokens, or by observed lengths with preemption"
    )
    admission_batch: int = Field(
        1, ge=1, description="a full batch of 32+ decodes admits new requests only once this many rows are free"
    )
    enable_prefix_caching: bool = Field(True, description="share KV of common prompt prefixes")
    overlap_scheduling: bool = Field(
        True, description="plan the next step while the current one runs (off: new requests start a step sooner)"
    )
    launch_ahead: bool | None = Field(
        None,
        description="with overlap scheduling, launch the next step before this one's tokens reach the host "
        "(default: on a GPU)",
    )
    enforce_eager: bool = Field(False, description="GPU: no CUDA graphs")
    max_prefill_graph_tokens: int = Field(
        2048, ge=0, description="GPU: prefill steps of up to this many tokens replay CUDA graphs (0: decode graphs only)"
    )
    fuse_mixed_steps: bool = Field(
        True, description="GPU: a step's decodes and prefill chunks share one pass over the weights (off: two passes)"
    )
    attention_backend: Literal["auto", "triton", "torch"] = Field(
        "auto", description="layer kernels: auto (Triton on CUDA, torch elsewhere), triton or torch"
    )
    seed: int = Field(0, description="engine seed for requests without their own")
    step_timeout_s: float | None = Field(
        None,
        ge=0,
        description="seconds one engine step may take before the workers count as hung and are killed "
        "(default 60 on GPU, 300 on CPU; the first 4 steps get 5x; 0: never)",
    )
    dead_worker_exit_delay: float = Field(
        5.0, ge=0, description="after a worker dies: seconds of 503 answers before the server exits with status 1"
    )
    cache_dir: str | None = Field(
        None, description="where converted GGUF models are cached (default ~/.cache/lightgate)"
    )

    @field_validator("model_aliases", "api_keys", "cors_allow_origins", "cors_allow_headers", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            if text.lower() == "none":
                return []
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model=self.model,
            tokenizer=self.tokenizer,
            dtype=self.dtype,
            device=self.device,
            tensor_parallel_size=self.tensor_parallel_size,
            kv_cache_dtype=self.kv_cache_dtype,
            weight_quantization=self.weight_quantization,
            kv_cache_memory_gb=self.kv_cache_memory_gb,
            gpu_memory_utilization=self.gpu_memory_utilization,
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_waiting_requests=self.max_waiting_requests,
            admission=self.admission,
            admission_batch=self.admission_batch,
            enable_prefix_caching=self.enable_prefix_caching,
            overlap_scheduling=self.overlap_scheduling,
            launch_ahead=self.launch_ahead,
            seed=self.seed,
            enforce_eager=self.enforce_eager,
            max_prefill_graph_tokens=self.max_prefill_graph_tokens,
            fuse_mixed_steps=self.fuse_mixed_steps,
            attention_backend=self.attention_backend,
            step_timeout_s=self.step_timeout_s,
        )


def add_cli_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; a flag left out keeps the environment's (or the default) value."""
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description} [env LIGHTGATE_{name.upper()}]"
        annotation = field.annotation
        if annotation is bool or set(get_args(annotation)) == {bool, type(None)}:  # bool | None: unset is None
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        choices = None
        if get_origin(annotation) is Literal:
            choices = list(get_args(annotation))
        parser.add_argument(flag, dest=name, default=None, choices=choices, help=help_text)


def load_settings(args: argparse.Namespace | None = None) -> Settings:
    """Settings from the environment and `.env`, with the flags that were given on top."""
    overrides = {}
    if args is not None:
        overrides = {
            name: value
            for name, value in vars(args).items()
            if name in Settings.model_fields and value is not None
        }
    return Settings(**overrides)
