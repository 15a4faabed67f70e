"""What the engine hands back: `RequestOutput` holding one `CompletionOutput` per choice."""

from __future__ import annotations

from dataclasses import dataclass, field

# One position's logprobs: {token_id: Logprob}. The sampled (or prompt) token is always in it,
# plus up to `logprobs` top alternatives.
LogprobsDict = dict[int, "Logprob"]


@dataclass(slots=True)
class Logprob:
    logprob: float
    rank: int  # 1 = most likely
    decoded_token: str | None = None


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[LogprobsDict] | None = None  # one entry per token in token_ids
    finish_reason: str | None = None  # None while running; "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[LogprobsDict | None] | None = None  # first entry None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    metrics: dict[str, float] = field(default_factory=dict)  # arrival_time, first_token_time, ...


class OutputAccumulator:
    """Folds the engine's per-step deltas of one request into cumulative `RequestOutput`s."""

    def __init__(self, num_choices: int) -> None:
        self._choices: list[CompletionOutput | None] = [None] * num_choices
        self._last: RequestOutput | None = None

    def add(self, delta: RequestOutput) -> None:
        self._last = delta
        for d in delta.outputs:
            acc = self._choices[d.index]
            if acc is None:
                acc = self._choices[d.index] = CompletionOutput(
                    d.index, "", [], [] if d.logprobs is not None else None
                )
            acc.text += d.text
            acc.token_ids.extend(d.token_ids)
            if d.logprobs is not None and acc.logprobs is not None:
                acc.logprobs.extend(d.logprobs)
            acc.finish_reason = d.finish_reason or acc.finish_reason
            acc.stop_reason = d.stop_reason if d.stop_reason is not None else acc.stop_reason

    def result(self) -> RequestOutput:
        """A cumulative snapshot (copies: later deltas do not change it)."""
        delta = self._last
        assert delta is not None, "no output yet"
        outputs = [
            CompletionOutput(c.index, c.text, list(c.token_ids), None if c.logprobs is None else list(c.logprobs),
                             c.finish_reason, c.stop_reason)
            for c in self._choices
            if c is not None
        ]
        return RequestOutput(
            delta.request_id, delta.prompt, delta.prompt_token_ids, outputs, delta.finished,
            delta.prompt_logprobs, delta.num_cached_tokens, dict(delta.metrics),
        )


def merge_into(earlier: RequestOutput, later: list[RequestOutput]) -> RequestOutput:
    """The delta outputs `later`, which follow `earlier` for the same request in order, folded
    into `earlier` (changed in place and returned): each choice's text, tokens and logprobs
    follow on, its finish is the last one's. For a consumer that fell behind: one output
    instead of several, in time linear in what they hold."""
    choices = {c.index: c for c in earlier.outputs}
    texts: dict[int, list[str]] = {i: [c.text] for i, c in choices.items()}
    for out in later:
        for c in out.outputs:
            acc = choices.get(c.index)
            if acc is None:
                choices[c.index] = acc = CompletionOutput(c.index, "", [], None)
                texts[c.index] = []
                earlier.outputs.append(acc)
            texts[c.index].append(c.text)
            acc.token_ids.extend(c.token_ids)  # every delta's lists are its own
            if c.logprobs is not None:
                if acc.logprobs is None:
                    acc.logprobs = []
                acc.logprobs.extend(c.logprobs)
            acc.finish_reason = c.finish_reason or acc.finish_reason
            acc.stop_reason = c.stop_reason if c.stop_reason is not None else acc.stop_reason
        if earlier.prompt_logprobs is None:
            earlier.prompt_logprobs = out.prompt_logprobs
        earlier.num_cached_tokens = max(earlier.num_cached_tokens, out.num_cached_tokens)
        earlier.metrics.update(out.metrics)
        earlier.finished = out.finished
    for i, parts in texts.items():
        choices[i].text = "".join(parts)
    return earlier
