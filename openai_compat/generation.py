"""Engine requests as chat and completions run them, and the fields of their responses.

`GenerationStream` is one engine request and its consumer: its first output is fetched before
any response starts (so that a full queue or an oversized prompt still gets a real HTTP
status), every output is observed for metrics, and `close()` aborts it. `open_streams` starts
one per prompt; `push_events` writes a streamed response as the engine loop hands the streams'
outputs over. `finish_reason`, `make_usage`, `new_id` and `SYSTEM_FINGERPRINT` are what every
response carries.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from functools import partial

from engine import AsyncEngine, ImageInput, OutputStream, RequestOutput, SamplingParams
from openai_compat.errors import OpenAIError, from_exception
from openai_compat.metrics import RequestRecorder
from openai_compat.protocol import PromptTokensDetails, UsageInfo
from openai_compat.server_state import ServerState
from openai_compat.sse import DONE, DirectWriter, PushSSEResponse, format_event

SYSTEM_FINGERPRINT = "fp_lightgate"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


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
        recorder: RequestRecorder, images: Sequence[ImageInput] = (),
    ) -> None:
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.images = images  # a vision-language prompt's, one per placeholder run
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
            self._engine.add_request(self.prompt_ids, self.params, self.request_id, self._outputs.put, self.images)
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
    state: ServerState, prompts: list[list[int]], params: SamplingParams, request_id: str,
    images: Sequence[ImageInput] = (),
) -> list[GenerationStream]:
    """Start one engine request per prompt (with `images`: one prompt) and wait for each one's
    first output."""
    streams = [
        GenerationStream(state.engine, ids, params, request_id if len(prompts) == 1 else f"{request_id}-{i}",
                         state.metrics.recorder(), images)
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
