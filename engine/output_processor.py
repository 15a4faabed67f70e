"""A request's output state in the server process, and building what the engine core hands
back: `RequestState` (its choices, each a `Seq` with its detokenizer and stop-string matcher;
prompt logprobs; timings), a request's `RequestOutput` from its state, the text a finished
choice still holds back, and `ProcessedStep` (what taking a step's result in gave)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from engine.outputs import CompletionOutput, LogprobsDict, RequestOutput
from engine.router.detokenizer import ByteLevelDetokenizer, IncrementalDetokenizer, StopStringMatcher
from engine.router.seq import Seq
from engine.sampling_params import SamplingParams


@dataclass(slots=True)
class Choice:
    seq: Seq
    detok: IncrementalDetokenizer | ByteLevelDetokenizer | None
    stop_matcher: StopStringMatcher | None


@dataclass(slots=True)
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    choices: list[Choice]
    arrival_time: float
    prompt_logprobs: list[LogprobsDict | None] | None = None
    prompt_logprobs_planned: int = 1  # prompt positions whose logprobs are collected or in flight
    num_unfinished: int = 0
    first_token_time: float | None = None




class ProcessedStep(NamedTuple):
    outputs: list[RequestOutput]  # one delta per request the step changed
    num_seqs: int  # sequences the step ran
    num_tokens: int  # tokens it computed


def flush_text(choice: Choice) -> str:
    """The text a finishing choice's detokenizer and stop-string matcher still hold back."""
    if choice.detok is None:
        return ""
    text = choice.detok.flush()
    if choice.stop_matcher is None:
        return text
    emitted, stop_str = choice.stop_matcher.feed(text)
    return emitted if stop_str is not None else emitted + choice.stop_matcher.flush()


def request_output(state: RequestState, outputs: list[CompletionOutput], finished: bool) -> RequestOutput:
    """The request's output carrying `outputs` (its choices' deltas)."""
    metrics = {"arrival_time": state.arrival_time}
    if state.first_token_time is not None:
        metrics["first_token_time"] = state.first_token_time
    return RequestOutput(
        request_id=state.request_id,
        prompt=state.prompt,
        prompt_token_ids=state.prompt_token_ids,
        outputs=outputs,
        finished=finished,
        prompt_logprobs=state.prompt_logprobs,
        num_cached_tokens=state.choices[0].seq.num_prefix_cache_hit or 0,
        metrics=metrics,
    )
