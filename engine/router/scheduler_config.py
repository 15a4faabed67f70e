"""`SchedulerConfig`: what the router is asked for, frozen, from the engine's config and the
worker's KV pool size."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from engine.config import EngineConfig


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int  # rows of req_to_token = running sequences at most
    max_num_batched_tokens: int  # token budget of one step
    max_model_len: int
    num_slots: int  # KV pool size in tokens
    admission: Literal["conservative", "aggressive"] = "conservative"
    watermark: float = 0.0  # fraction of the pool the admission check keeps spare
    initial_output_len: int = 128  # aggressive: predicted output length before any has finished
    enable_prefix_caching: bool = False
    # While the running batch is full (fewer free rows than this) and large, admission waits
    # until this many rows are free (or `_MAX_ADMISSION_WAIT` steps passed), so prompts are
    # computed in fewer, larger passes. 1: admit whenever a row is free (engine/router/admission.py).
    admission_batch: int = 1
    # Image tokens a step may embed (vision-language models; engine/router/image_budget.py);
    # None: no bound.
    max_image_tokens_per_step: int | None = None

    def __post_init__(self) -> None:
        for name in (
            "max_num_seqs", "max_num_batched_tokens", "max_model_len", "num_slots", "initial_output_len",
            "admission_batch",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_image_tokens_per_step is not None and self.max_image_tokens_per_step < 1:
            raise ValueError(f"max_image_tokens_per_step must be at least 1, got {self.max_image_tokens_per_step}")
        if self.admission not in ("conservative", "aggressive"):
            raise ValueError(f"admission must be conservative or aggressive, got {self.admission!r}")
        if not 0.0 <= self.watermark < 1.0:
            raise ValueError(f"watermark must be in [0, 1), got {self.watermark}")

    @classmethod
    def from_engine_config(cls, config: EngineConfig, num_slots: int, max_model_len: int) -> SchedulerConfig:
        assert config.max_num_batched_tokens is not None and config.max_num_seqs is not None, (
            "resolve() the EngineConfig first"
        )
        return cls(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=max_model_len,
            num_slots=num_slots,
            admission=config.admission,
            enable_prefix_caching=config.enable_prefix_caching,
            admission_batch=config.admission_batch,
            max_image_tokens_per_step=config.max_image_tokens_per_step,
        )
