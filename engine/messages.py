"""Messages between the engine core (server process) and the model workers.

A `StepPlan` is a diff, not the batch: a sequence's sampling state travels only when it
(re)enters a `req_to_token` row; afterwards a step names only the row, the tokens to compute
and the slots to write them to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.multimodal import PromptImage
from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from engine.router.seq import Seq


@dataclass(slots=True)
class NewRow:
    """Everything a worker keeps per row: sent once when a sequence takes a row."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # non-empty when a preempted sequence comes back
    # The ids that end generation (eos unless ignore_eos, and params.stop_token_ids): the sampler
    # masks them while the row is short of params.min_tokens.
    stop_token_ids: frozenset[int] = frozenset()
    images: tuple[PromptImage, ...] = ()  # a vision-language model's images, in prompt order


# Not frozen: a frozen dataclass sets each field through object.__setattr__, several times the
# cost of building a plain one, and one is built per sequence per step (docs/benchmarks.md,
# "Figures behind choices in the code").
@dataclass(slots=True)
class SeqStep:
    """One sequence's part of a step, as the scheduler plans it and the worker runs it."""

    row: int
    start_pos: int  # tokens of this row already in the KV pool
    token_ids: list[int]  # tokens computed this step, at positions start_pos..
    out_slots: list[int]  # one KV slot per token in token_ids
    sample: bool  # this step reaches the last known token: sample the next one
    prefix_slots: list[int] | None = None  # slots of positions [0, start_pos) for a new row
    new_row: NewRow | None = None
    prompt_logprobs: int | None = None  # compute prompt logprobs for this chunk (set by the engine core)
    # The router's sequence, in the server process only: never pickled, so the worker gets None.
    seq: Seq | None = field(default=None, repr=False, compare=False)

    def __reduce__(self) -> tuple[type, tuple]:
        # Pickled as its constructor's arguments, not as a slots dataclass's default state: fewer
        # bytes, and less time to pickle here and to unpickle in the worker (docs/benchmarks.md,
        # run of 2026-12-01 22:45). `seq` stays behind.
        return SeqStep, (
            self.row, self.start_pos, self.token_ids, self.out_slots, self.sample, self.prefix_slots, self.new_row,
            self.prompt_logprobs,
        )


@dataclass(slots=True)
class StepPlan:
    step_id: int
    seqs: list[SeqStep]
    freed_rows: list[int] = field(default_factory=list)


@dataclass(slots=True)
class TokenLogprobs:
    """Logprobs of one position, as the sampler computes them (raw log_softmax of the logits):
    the chosen (sampled, or actual prompt) token first, then the top alternatives."""

    token_id: int
    logprob: float
    rank: int  # of token_id: 1 = most likely
    top_ids: list[int]  # most likely first
    top_logprobs: list[float]


@dataclass(slots=True)
class StepResult:
    step_id: int
    # One entry per SeqStep with sample=True, in plan order.
    sampled_token_ids: list[int]
    sampled_logprobs: list[TokenLogprobs | None]
    # Per plan index (only for SeqSteps that asked): logprobs of the chunk's prompt tokens,
    # one per token whose successor is in the prompt.
    prompt_logprobs: dict[int, list[TokenLogprobs]] = field(default_factory=dict)
    # From the step's launch (or the previous step's end, when launched behind it) to its
    # tokens on the host: forward pass and sampling.
    execute_seconds: float = 0.0
    # The worker's time waiting for this step's plan (and reading it) with nothing of its own
    # on the device: the device's idle time before the step.
    wait_seconds: float = 0.0
    # The worker launched the next step before sending this result (`EngineConfig.launch_ahead`).
    launched_ahead: bool = False


@dataclass(slots=True)
class WorkerInfo:
    """What a worker reports once its model is loaded and its KV pool allocated."""

    num_slots: int
    kv_cache_bytes: int
    max_model_len: int
    device: str
    dtype: str  # the model's dtype
    kv_dtype: str  # the KV pool's dtype: the model's, another float dtype, or int8
    # Tokens the pool holds over the tokens the same memory holds in the model's dtype
    # (int8 with bf16 scales at head_dim 64: 1.94 against bf16, 3.88 against float32).
    kv_capacity_ratio: float = 1.0
    # CUDA graphs captured: decode batch sizes and packed-step token counts (empty: none).
    graph_batch_sizes: list[int] = field(default_factory=list)
    graph_token_counts: list[int] = field(default_factory=list)

    def kv_cache_summary(self) -> str:
        """One line for the start-up log, e.g. 'KV cache: 90382 tokens, 1.00 GiB (int8; 3.88x
        the float32 capacity) on cpu'."""
        kind = self.kv_dtype
        if self.kv_dtype != self.dtype:
            kind += f"; {self.kv_capacity_ratio:.2f}x the {self.dtype} capacity"
        return f"KV cache: {self.num_slots} tokens, {self.kv_cache_bytes / (1 << 30):.2f} GiB ({kind}) on {self.device}"
