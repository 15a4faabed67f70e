"""One choice of a request as the router sees it: a `Seq` and its `SequenceStatus`.

A request with `n > 1` becomes `n` sequences (`seq_id = f"{request_id}#{i}"`). They share the
prompt's KV: sibling `i > 0` waits until a sibling has computed the first `prompt_len - 1`
positions, then takes references to those slots and computes only the last prompt token
itself (its own sampling starts there). With the radix prefix cache on, that sharing goes
through the cache: the prompt is cached once a sequence has computed it, and siblings match it.

Life of a sequence: WAITING → (admitted) RUNNING → FINISHED_*; preemption sends a RUNNING
sequence back to WAITING with `num_computed_tokens = 0` and its output tokens kept, so it
recomputes prompt + output when it is admitted again.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.multimodal import PromptImage
from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from engine.router.prefix_cache import RadixNode


PLACEHOLDER_TOKEN = -1  # an output token sampled by a step in flight; the worker knows its id


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED_STOPPED = enum.auto()  # eos, a stop token id or a stop string
    FINISHED_LENGTH = enum.auto()  # max_tokens or the model's context
    FINISHED_ABORTED = enum.auto()  # the client went away or asked to stop

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's `finish_reason` for a finished status; None while waiting or running."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS: dict[SequenceStatus, str] = {
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH: "length",
    SequenceStatus.FINISHED_ABORTED: "abort",
}


@dataclass(slots=True, eq=False)
class Seq:
    """Mutable per-choice state. Identity matters (eq=False): two sequences are never equal."""

    request_id: str
    seq_id: str
    index: int  # the choice index, 0..n-1
    prompt_token_ids: list[int]  # shared between siblings; never mutated
    params: SamplingParams
    max_tokens: int  # resolved: params.max_tokens or what is left of the context
    # Resolved: the ids that end generation once params.min_tokens are out (eos unless
    # params.ignore_eos, and params.stop_token_ids); shared between siblings.
    stop_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.time)
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    # Positions [0, num_computed_tokens) have their K/V in the pool.
    num_computed_tokens: int = 0
    req_idx: int | None = None  # the req_to_token row while running
    # slots[p] is the KV slot of position p. Between `schedule()` and `update_after_step()` it also
    # holds the slots of the tokens scheduled in that step, so len(slots) >= num_computed_tokens.
    slots: list[int] = field(default_factory=list)
    # Leading slots shared by reference with siblings (the prompt minus its last token) or, with the
    # prefix cache on, slots on the locked path of the cache; else 0.
    num_shared_prefix: int = 0
    prefix_node: RadixNode | None = None  # the prefix-cache node this sequence locks while running
    num_prefix_cache_hit: int | None = None  # tokens matched in the prefix cache at first admission
    num_preemptions: int = 0
    # Overlapped steps (the engine plans step k+1 while step k runs): a step in flight that
    # samples for this sequence left a placeholder (`PLACEHOLDER_TOKEN`) at the end of its
    # outputs, so the next step can compute it already (the worker fills in the sampled id).
    num_placeholders: int = 0  # trailing outputs not sampled yet
    num_steps_in_flight: int = 0  # sampled steps sent whose result is not processed yet
    # A vision-language prompt's images (sent to the worker with the row) and the prompt as the
    # prefix cache keys it: each image's placeholders as an id from its content hash
    # (engine/multimodal.py `place_images`); None when the prompt has no images.
    images: tuple[PromptImage, ...] = ()
    prompt_cache_keys: list[int] | None = None
    # prompt + output, appended in place: the scheduler slices it every step without copying.
    _all_token_ids: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("a sequence needs at least one prompt token")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        self._all_token_ids = [*self.prompt_token_ids, *self.output_token_ids]

    # -- derived values -------------------------------------------------------------------------

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Output tokens, placeholders included (what the scheduler plans with)."""
        return len(self.output_token_ids)

    @property
    def num_sampled_tokens(self) -> int:
        """Output tokens whose ids are known (placeholders left out)."""
        return len(self.output_token_ids) - self.num_placeholders

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """prompt + output. The live list, not a copy: read it, never mutate it."""
        return self._all_token_ids

    def cache_keys(self, n: int) -> list[int]:
        """The first `n` of prompt + output as the prefix cache keys them (see `prompt_cache_keys`)."""
        keys = self.prompt_cache_keys
        if keys is None:
            return self._all_token_ids[:n]
        return keys[:n] + self._all_token_ids[len(keys) : n]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self._all_token_ids) - self.num_computed_tokens

    @property
    def max_num_slots(self) -> int:
        """Slots this sequence holds at its largest: the last sampled token is never computed."""
        return self.num_prompt_tokens + self.max_tokens - 1

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.finish_reason

    # -- mutation ----------------------------------------------------------------------------------

    def append_token(self, token_id: int) -> None:
        """Add one sampled token (the engine calls this once per step with `sample=True`):
        it takes the place of the oldest placeholder, if any."""
        if self.num_placeholders:
            i = len(self.output_token_ids) - self.num_placeholders
            self.output_token_ids[i] = token_id
            self._all_token_ids[self.num_prompt_tokens + i] = token_id
            self.num_placeholders -= 1
            return
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)

    def add_placeholder(self) -> None:
        """A step in flight samples this sequence's next token: plan with it already."""
        self.output_token_ids.append(PLACEHOLDER_TOKEN)
        self._all_token_ids.append(PLACEHOLDER_TOKEN)
        self.num_placeholders += 1

    def drop_placeholders(self) -> None:
        """Forget tokens not sampled yet (the sequence finished, or loses its KV)."""
        if self.num_placeholders:
            del self.output_token_ids[-self.num_placeholders :]
            del self._all_token_ids[-self.num_placeholders :]
            self.num_placeholders = 0
