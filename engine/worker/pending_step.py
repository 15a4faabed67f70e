"""`PendingStep`: a step the model runner has launched, whose tokens are still on their way to the host."""

from __future__ import annotations

from engine.messages import StepResult
from engine.worker.sampler import PendingSample
from engine.worker.sampling_state import SamplingState


class PendingStep:
    """A launched step (`ModelRunner.launch`): `finish()` waits for its tokens and gives its
    result, once; `done()` says whether waiting would return at once."""

    def __init__(
        self, result: StepResult, sample: PendingSample | None = None, states: list[SamplingState] | None = None
    ) -> None:
        self._result = result
        self._sample = sample
        self._states = states or []
        self._finished = sample is None

    def done(self) -> bool:
        return self._sample is None or self._sample.done()

    def wait(self) -> None:
        """Until `done()`, without reading the tokens (any thread)."""
        if self._sample is not None:
            self._sample.copy.wait()

    def finish(self) -> StepResult:
        if self._finished:
            return self._result
        assert self._sample is not None
        out = self._sample.result()
        result = self._result
        result.sampled_token_ids = out.token_ids
        # (rows that asked for no logprobs have None)
        result.sampled_logprobs = out.logprobs if out.logprobs is not None else [None] * len(self._states)
        for state, token_id in zip(self._states, out.token_ids, strict=True):
            state.append(token_id)
        self._finished = True
        return result
