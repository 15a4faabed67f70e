"""What chat and completions share: server state, engine streams, sampling params, usage.

`ServerState` knows whether the engine is loading, ready, dead or draining, and which model
names it answers to. `GenerationStream` is one engine request and its consumer: its first
output is fetched before any response starts (so that a full queue or an oversized prompt still
gets a real HTTP status), every output is observed for metrics, and `close()` aborts it.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request

from engine import AsyncEngine, EngineStats, OutputStream, RequestOutput, RequestOutputKind, SamplingParams
from openai_compat.config import Settings
from openai_compat.daemon_executor import DaemonThreadExecutor
from openai_compat.errors import (
    OpenAIError,
    from_exception,
    from_validation_error,
    invalid_json,
    model_not_found,
    not_ready,
    unsupported_content_type,
)
from openai_compat.metrics import Metrics, RequestRecorder
from openai_compat.prompt_size import PromptBound
from openai_compat.protocol import PromptTokensDetails, SamplingFields, UsageInfo
from openai_compat.sse import DONE, DirectWriter, PushSSEResponse, format_event

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

SYSTEM_FINGERPRINT = "fp_lightgate"
_TOKEN_ID_KEY = re.compile(r"-?[0-9]{1,18}")  # ASCII digits only: int() also takes "5_0", " 5", "١٢"


class ServerState:
    """The engine plus what the HTTP side knows about it; one per app."""

    def __init__(self, settings: Settings, engine: AsyncEngine) -> None:
        self.settings = settings
        self.engine = engine
        self.created = int(time.time())
        self.loaded = False
        self.load_error: BaseException | None = None
        self.draining = False
        self.metrics = Metrics(self._stats)
        # The fewest tokens a text can be, from its length: set once the tokenizer is loaded,
        # None when the tokenizer does not vouch for one (prompt_size.py).
        self.prompt_bound: PromptBound | None = None
        # A daemon thread: a tokenization in flight never holds up the process's exit.
        self._tokenizer_thread = DaemonThreadExecutor("lightgate-tokenizer")

    def _stats(self) -> EngineStats | None:
        if not self.loaded:
            return None
        try:
            return self.engine.stats()
        except Exception:  # a dead engine must not take /metrics down with it
            return None

    @property
    def served_model_name(self) -> str:
        return self.settings.served_model_name or self.engine.model_name

    @property
    def model_names(self) -> list[str]:
        return [self.served_model_name, *self.settings.model_aliases]

    def mark_loaded(self) -> None:
        self.loaded = True
        self.metrics.model_name = self.served_model_name

    @property
    def healthy(self) -> bool:
        return self.loaded and not self.engine.errored

    def check_ready(self) -> None:
        if self.load_error is not None:
            raise not_ready(f"The model failed to load: {self.load_error}")
        if not self.loaded:
            raise not_ready("The model is still loading. Please retry shortly.")
        if self.engine.errored:
            raise not_ready(f"The inference engine is not available: {self.engine.dead_error}")
        if self.draining:
            raise not_ready("The server is shutting down.")

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.model_names:
            raise model_not_found(model)

    async def run_tokenizer(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Tokenizer work (CPU) off the event loop, one call at a time: a Hugging Face fast
        tokenizer is not safe to use from several threads at once."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizer_thread, partial(fn, *args, **kwargs))

    def close(self) -> None:
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)

    @property
    def tokenizer(self) -> Any:
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise OpenAIError("This model ships no tokenizer: send token ids as the prompt.", param="prompt")
        return tokenizer


async def parse_body(request: Request, model: type[M]) -> M:
    """The request body validated as `model`; 400 naming the field on any problem, and 400
    `unsupported_content_type` unless the body is declared JSON (`application/json`, any
    parameters such as `; charset=utf-8`), before it is read."""
    content_type = request.headers.get("content-type")
    if content_type is None or content_type.partition(";")[0].strip().lower() != "application/json":
        raise unsupported_content_type(content_type)
    try:
        body = await request.body()
    except ClientDisconnect:  # gone before sending the whole body: nothing to answer, not an error
        raise OpenAIError("The client disconnected before sending the request body.", status_code=499) from None
    try:
        # strict: JSON types as the spec gives them ("2" is no integer, "yes" no boolean), as OpenAI
        return model.model_validate_json(body, strict=True)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        if first["type"] in ("json_invalid", "model_type") and not first["loc"]:
            raise invalid_json() from None
        raise from_validation_error(e) from None


def check_num_sequences(state: ServerState, num_sequences: int, param: str) -> None:
    """400 for a request that asks for more sequences (prompts x n) than the server ever queues:
    a 429 would have the client retry forever."""
    limit = state.settings.engine.max_waiting_requests
    if num_sequences > limit:
        raise OpenAIError(
            f"This request asks for {num_sequences} sequences (prompts x n); the server queues at most {limit}.",
            param=param,
        )


def check_stream_options(req: SamplingFields) -> None:
    if req.stream_options is not None and not req.stream:
        raise OpenAIError("'stream_options' is only allowed when 'stream' is true.", param="stream_options")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def build_sampling_params(
    req: SamplingFields, *, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None
) -> SamplingParams:
    """OpenAI's request fields as engine `SamplingParams` (which raises ValueError naming a field)."""
    logit_bias = None
    if req.logit_bias:
        if not all(_TOKEN_ID_KEY.fullmatch(token) for token in req.logit_bias):
            raise ValueError("logit_bias keys must be token ids (integers as strings).", "logit_bias")
        logit_bias = {int(token): float(bias) for token, bias in req.logit_bias.items()}
    return SamplingParams(
        n=req.n if req.n is not None else 1,
        temperature=req.temperature if req.temperature is not None else 1.0,
        top_p=req.top_p if req.top_p is not None else 1.0,
        top_k=req.top_k if req.top_k is not None else -1,
        min_p=req.min_p if req.min_p is not None else 0.0,
        seed=req.seed,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=req.repetition_penalty if req.repetition_penalty is not None else 1.0,
        logit_bias=logit_bias,
        stop=req.stop,
        stop_token_ids=req.stop_token_ids,
        include_stop_str_in_output=req.include_stop_str_in_output,
        ignore_eos=req.ignore_eos,
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        skip_special_tokens=req.skip_special_tokens,
        spaces_between_special_tokens=req.spaces_between_special_tokens,
        output_kind=RequestOutputKind.DELTA,
    )


def finish_reason(reason: str) -> str:
    """The engine's finish reason as OpenAI's; an abort the client did not ask for is an error."""
    if reason in ("stop", "length"):
        return reason
    raise OpenAIError(
        "The request was aborted by the server.", status_code=503, type="server_error", code="aborted"
    )


def make_usage(num_prompt_tokens: int, num_completion_tokens: int, num_cached_tokens: int) -> UsageInfo:
    return UsageInfo(
        prompt_tokens=num_prompt_tokens,
        completion_tokens=num_completion_tokens,
        total_tokens=num_prompt_tokens + num_completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=num_cached_tokens),
    )


class GenerationStream:
    """One engine request (all its choices): first output prefetched, then pulled one by one
    (`next_output`) or pushed as the engine loop hands them over (`push`)."""

    def __init__(
        self, engine: AsyncEngine, prompt_ids: list[int], params: SamplingParams, request_id: str,
        recorder: RequestRecorder,
    ) -> None:
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.num_cached_tokens = 0
        self.num_generated_tokens = 0
        self.finished = False
        self._engine = engine
        self._recorder = recorder
        self._outputs = OutputStream()  # the request's consumer, from `start()` on
        self._pending: RequestOutput | None = None
        self._finish_reasons: dict[int, str] = {}  # choice index -> the engine's finish reason

    async def start(self) -> None:
        """Add the request and wait for its first output; raises what the engine refused the
        request with."""
        try:
            self._engine.add_request(self.prompt_ids, self.params, self.request_id, self._outputs.put)
            self._pending = await self._pull()
        except Exception:
            self.finished = True  # refused: nothing to abort, nothing to count
            raise

    async def next_output(self) -> RequestOutput | None:
        """The next delta output, or None once the request finished."""
        if self._pending is not None:
            out, self._pending = self._pending, None
            return out
        if self.finished:
            return None
        return await self._pull()

    async def _pull(self) -> RequestOutput:
        out = await self._outputs.get()
        self._observe(out)
        return out

    def push(self, on_output: Callable[[RequestOutput], None], on_error: Callable[[BaseException], None]) -> None:
        """Hand the rest of the outputs (the prefetched one first, now) to `on_output`, called
        from the engine loop as steps finish, instead of `next_output()`; an engine error goes
        to `on_error`. Neither may block or raise. `close()` still ends the request."""
        pending, self._pending = self._pending, None
        if pending is not None:
            on_output(pending)
        if self.finished:
            return

        def take(item: RequestOutput | BaseException) -> None:
            if self.finished:  # closed meanwhile
                return
            if isinstance(item, BaseException):
                self.finished = True
                on_error(item)
                return
            self._observe(item)
            on_output(item)

        self._outputs.forward_to(take)

    def _observe(self, out: RequestOutput) -> None:
        num_new = sum(len(c.token_ids) for c in out.outputs)
        self.num_generated_tokens += num_new
        self.num_cached_tokens = max(self.num_cached_tokens, out.num_cached_tokens)
        self._recorder.on_tokens(len(out.prompt_token_ids), num_new)
        for c in out.outputs:
            if c.finish_reason is not None:
                self._finish_reasons.setdefault(c.index, c.finish_reason)
        if out.finished:
            self.finished = True
            reasons = self._finish_reasons
            self._recorder.on_finish(reasons.get(0) or next(iter(reasons.values()), "stop"))

    async def close(self) -> None:
        """Abort the request unless it finished; safe to call more than once."""
        if not self.finished:
            self.finished = True
            self._recorder.on_finish("abort")
            await self._engine.abort(self.request_id)


async def open_streams(
    state: ServerState, prompts: list[list[int]], params: SamplingParams, request_id: str
) -> list[GenerationStream]:
    """Start one engine request per prompt and wait for each one's first output."""
    streams = [
        GenerationStream(state.engine, ids, params, request_id if len(prompts) == 1 else f"{request_id}-{i}",
                         state.metrics.recorder())
        for i, ids in enumerate(prompts)
    ]
    tasks = [asyncio.ensure_future(s.start()) for s in streams]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close_all(streams)
        raise
    return streams


async def close_all(streams: list[GenerationStream]) -> None:
    for stream in streams:
        try:
            await stream.close()
        except Exception:  # closing must reach every stream
            pass


def push_events(
    streams: list[GenerationStream],
    events: Callable[[int, RequestOutput], list[bytes]],
    closing: Callable[[], list[bytes]],
    opening: Callable[[], list[bytes]] = list,
) -> PushSSEResponse:
    """A streamed response written as the engine loop hands the streams' outputs over: `opening`,
    then `events(prompt index, output)` for each, then `closing` and `[DONE]` once every stream
    finished. An error (the engine died, or `events` raised for an abort the client did not ask
    for) ends it with an error event and `[DONE]`; the streams are closed however it ends."""

    def start(writer: DirectWriter) -> None:
        remaining = len(streams)

        def on_error(e: BaseException) -> None:
            writer.write(format_event(from_exception(e).sse_data()))
            writer.end(DONE)

        def taker(p: int) -> Callable[[RequestOutput], None]:
            def on_output(out: RequestOutput) -> None:
                nonlocal remaining
                try:
                    for event in events(p, out):
                        writer.write(event)
                    if out.finished:
                        remaining -= 1
                        if not remaining:
                            for event in closing():
                                writer.write(event)
                            writer.end(DONE)
                except Exception as e:
                    on_error(e)

            return on_output

        for event in opening():
            writer.write(event)
        for p, stream in enumerate(streams):
            stream.push(taker(p), on_error)

    return PushSSEResponse(start, cleanup=partial(close_all, streams))
