"""Per-request generation settings, named as vLLM names them.

A `SamplingParams` is validated once when it is built (`ValueError` naming the field on bad
input) and is treated as immutable afterwards.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from engine.structured_output import StructuredOutput

MAX_LOGPROBS = 20
# Stop strings are matched on the engine loop's thread at every token, at a cost that grows with
# their number and length (a partial match is looked for at every suffix): bounded, so one request
# cannot slow every stream. OpenAI takes 4 strings; these bounds leave room for any real use.
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_LEN = 1024


class RequestOutputKind(enum.Enum):
    CUMULATIVE = 0  # each RequestOutput carries everything generated so far
    DELTA = 1  # each RequestOutput carries only what is new since the last one
    FINAL_ONLY = 2  # one RequestOutput, when the request finishes


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to the model's context
    min_tokens: int = 0
    logprobs: int | None = None  # alternatives per sampled token (0..20); None: no logprobs
    prompt_logprobs: int | None = None
    structured_output: StructuredOutput | None = None  # a constraint the output must meet
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == 0:
            self.top_k = -1
        self._verify()

    def _verify(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"{name} {why}", name)

        if not isinstance(self.n, int) or self.n < 1:
            bad("n", f"must be at least 1, got {self.n}.")
        if self.n > 128:
            bad("n", f"must be at most 128, got {self.n}.")
        if self.temperature < 0:
            bad("temperature", f"must be non-negative, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", f"must be in (0, 1], got {self.top_p}.")
        if self.top_k < -1:
            bad("top_k", f"must be -1 (disable), 0 (disable) or at least 1, got {self.top_k}.")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", f"must be in [0, 1], got {self.min_p}.")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}.")
        if not 0.0 < self.repetition_penalty <= 2.0:
            bad("repetition_penalty", f"must be in (0, 2], got {self.repetition_penalty}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            bad("max_tokens", f"must be at least 1, got {self.max_tokens}.")
        if self.min_tokens < 0:
            bad("min_tokens", f"must be non-negative, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must be at most max_tokens={self.max_tokens}, got {self.min_tokens}.")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                bad(name, f"must be in [0, {MAX_LOGPROBS}], got {value}.")
        if self.logit_bias:
            for token_id, bias in self.logit_bias.items():
                if not -100.0 <= bias <= 100.0:
                    bad("logit_bias", f"values must be in [-100, 100], got {bias} for token {token_id}.")
        if any(not s for s in self.stop):  # type: ignore[union-attr]
            bad("stop", "must not contain empty strings.")
        if len(self.stop) > MAX_STOP_STRINGS:  # type: ignore[arg-type]
            bad("stop", f"may hold at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}.")  # type: ignore[arg-type]
        if any(len(s) > MAX_STOP_STRING_LEN for s in self.stop):  # type: ignore[union-attr]
            bad("stop", f"strings may be at most {MAX_STOP_STRING_LEN} characters long.")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            bad("seed", "is out of range.")
        if self.structured_output is not None and not isinstance(self.structured_output, StructuredOutput):
            bad("structured_output", f"must be a StructuredOutput, got {type(self.structured_output).__name__}.")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def needs_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )
