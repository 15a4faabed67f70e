"""POST /v1/completions: prompt(s) → engine → JSON or SSE chunks.

`prompt` is a string, a list of strings, a list of token ids or a list of such lists; each
prompt is one engine request with `n` choices, and its choices are numbered
`prompt_index * n + choice_index`. With `echo` the prompt text (and, with `logprobs`, the
prompt's logprobs) lead each choice. The text may be constrained as a chat answer is
(`response_format`, `guided_*`, `structured_outputs`: docs/tools.md).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engine import RequestOutput
from openai_compat.errors import OpenAIError, from_exception, unsupported
from openai_compat.generation import (
    SYSTEM_FINGERPRINT,
    GenerationStream,
    close_all,
    finish_reason,
    make_usage,
    new_id,
    open_streams,
    push_events,
)
from openai_compat.logprobs import CompletionLogprobsBuilder
from openai_compat.prompt_size import check_prompt_text
from openai_compat.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse
from openai_compat.request_parsing import (
    build_sampling_params,
    check_num_sequences,
    check_stream_options,
    parse_body,
)
from openai_compat.server_state import ServerState
from openai_compat.sse import (
    ClientDisconnected,
    format_event,
    run_until_disconnect,
)
from openai_compat.stream_chunks import ChunkTemplate
from openai_compat.tool_calls.constraints import compile_constraint, text_structured_output


def split_prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise OpenAIError("'prompt' must not be empty.", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    return list(prompt)  # type: ignore[arg-type]


def tokenize_prompts(tokenizer: Any, prompts: list[str | list[int]]) -> list[list[int]]:
    """Token ids of every prompt (runs in a worker thread)."""
    return [list(tokenizer.encode(p)) if isinstance(p, str) else p for p in prompts]


class _Choice:
    """One choice's running state: echo still owed, logprobs offsets."""

    def __init__(self, echo_text: str | None, builder: CompletionLogprobsBuilder | None) -> None:
        self.echo_text = echo_text
        self.builder = builder
        self.text = ""
        self.logprobs = CompletionLogprobs() if builder is not None else None
        self.finish_reason: str | None = None

    def delta(self, out: RequestOutput, token_ids: list[int], text: str, entries: Any) -> tuple[str, CompletionLogprobs | None]:
        """This output's text and logprobs for the choice, with the echo in front the first time."""
        logprobs = CompletionLogprobs() if self.builder is not None else None
        if self.echo_text is not None:
            text = self.echo_text + text
            if self.builder is not None:
                self.builder.add(out.prompt_token_ids, out.prompt_logprobs or [None] * len(out.prompt_token_ids), logprobs)
            self.echo_text = None
        if self.builder is not None:
            self.builder.add(token_ids, entries or [], logprobs)
        return text, logprobs


class CompletionServing:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def create(self, request: Request) -> Response:
        state = self.state
        state.check_ready()
        req = await parse_body(request, CompletionRequest)
        state.check_model(req.model)
        field = req.unsupported_field()
        if field is not None:
            raise unsupported(field)
        check_stream_options(req)
        prompts = split_prompts(req.prompt)
        tokenizer = state.engine.tokenizer
        if tokenizer is None and any(isinstance(p, str) for p in prompts):
            raise OpenAIError("This model ships no tokenizer: send token ids as the prompt.", param="prompt")
        check_num_sequences(state, len(prompts) * (req.n or 1), "n" if (req.n or 1) > 1 else "prompt")
        try:  # every check that needs no tokens, before the tokenizer's work
            params = build_sampling_params(
                req,
                max_tokens=req.max_tokens,
                logprobs=req.logprobs,
                prompt_logprobs=req.logprobs if req.echo else None,
            )
            for p in prompts:  # a text far too long for the context: refused without tokenizing it
                if isinstance(p, str):
                    check_prompt_text(p, state.prompt_bound, state.engine.max_model_len, params.max_tokens)
        except ValueError as e:  # PromptTooLongError too: the context-length 400
            raise from_exception(e, prompt_param="prompt") from None
        constraint = text_structured_output(req)
        if constraint is not None:
            await compile_constraint(state.engine, constraint, req)  # a 400 if it cannot be enforced
            params.structured_output = constraint
        prompt_ids, echo_texts = await self._tokenize(req, prompts)
        try:
            request_id = new_id("cmpl")
            streams = await run_until_disconnect(request, open_streams(state, prompt_ids, params, request_id))
        except ClientDisconnected:
            return Response(status_code=499)
        except Exception as e:
            raise from_exception(e, state.settings.retry_after_s, prompt_param="prompt") from None
        choices = {
            (p, i): _Choice(echo_texts[p], CompletionLogprobsBuilder(tokenizer, req.logprobs) if req.logprobs is not None else None)
            for p in range(len(streams))
            for i in range(params.n)
        }
        if req.stream:
            events = _CompletionEvents(self, req, streams, choices, request_id)
            return push_events(streams, events.events, events.closing)
        try:
            response = await run_until_disconnect(request, self._collect(req, streams, choices, request_id))
        except ClientDisconnected:
            return Response(status_code=499)
        except Exception as e:
            raise from_exception(e, state.settings.retry_after_s) from None
        finally:
            await close_all(streams)
        return JSONResponse(response.model_dump())

    async def _tokenize(
        self, req: CompletionRequest, prompts: list[str | list[int]]
    ) -> tuple[list[list[int]], list[str | None]]:
        """The prompts' token ids, and their texts when the request echoes them."""
        state, tokenizer = self.state, self.state.engine.tokenizer
        if any(isinstance(p, str) for p in prompts):
            prompt_ids = await state.run_tokenizer(tokenize_prompts, tokenizer, prompts)
        else:  # token ids: nothing for the tokenizer thread (which may be busy with someone's text)
            prompt_ids = tokenize_prompts(tokenizer, prompts)
        echo_texts: list[str | None] = [None] * len(prompts)
        if req.echo:
            echo_texts = [p if isinstance(p, str) else await state.run_tokenizer(self._decode, p) for p in prompts]
        return prompt_ids, echo_texts

    def _decode(self, token_ids: list[int]) -> str:
        tokenizer = self.state.engine.tokenizer
        return "" if tokenizer is None else str(tokenizer.decode(token_ids))

    def _usage(self, streams: list[GenerationStream]) -> Any:
        return make_usage(
            sum(len(s.prompt_ids) for s in streams),
            sum(s.num_generated_tokens for s in streams),
            sum(s.num_cached_tokens for s in streams),
        )

    async def _collect(
        self, req: CompletionRequest, streams: list[GenerationStream], choices: dict[tuple[int, int], _Choice],
        request_id: str,
    ) -> CompletionResponse:
        async def drain(p: int, stream: GenerationStream) -> None:
            while (out := await stream.next_output()) is not None:
                for c in out.outputs:
                    choice = choices[(p, c.index)]
                    text, logprobs = choice.delta(out, c.token_ids, c.text, c.logprobs)
                    choice.text += text
                    if logprobs is not None and choice.logprobs is not None:
                        for name in ("text_offset", "token_logprobs", "tokens", "top_logprobs"):
                            getattr(choice.logprobs, name).extend(getattr(logprobs, name))
                    if c.finish_reason is not None:
                        choice.finish_reason = finish_reason(c.finish_reason)

        await asyncio.gather(*(drain(p, s) for p, s in enumerate(streams)))
        n = streams[0].params.n
        return CompletionResponse(
            id=request_id,
            created=int(time.time()),
            model=req.model,
            system_fingerprint=SYSTEM_FINGERPRINT,
            choices=[
                CompletionChoice(
                    index=p * n + i, text=c.text, logprobs=c.logprobs,
                    finish_reason=c.finish_reason or "stop",  # type: ignore[arg-type]
                )
                for (p, i), c in choices.items()
            ],
            usage=self._usage(streams),
        )


class _CompletionEvents:
    """The SSE events of a streamed completion: a chunk per choice per engine output that
    changed it (the echo first), the last one with its finish_reason; with
    `stream_options.include_usage` a usage chunk closes."""

    def __init__(
        self, serving: CompletionServing, req: CompletionRequest, streams: list[GenerationStream],
        choices: dict[tuple[int, int], _Choice], request_id: str,
    ) -> None:
        self.serving = serving
        self.req = req
        self.streams = streams
        self.choices = choices
        self.request_id = request_id
        self.created = int(time.time())
        self.exclude = None if req.include_usage else {"usage"}
        self.n = streams[0].params.n
        self.template = ChunkTemplate(
            CompletionResponse(
                id=request_id, created=self.created, model=req.model, system_fingerprint=SYSTEM_FINGERPRINT,
                choices=[],
            ),
            self.exclude,
        )

    def events(self, p: int, out: RequestOutput) -> list[bytes]:
        """Prompt `p`'s output as chunks; raises OpenAIError for an abort the client did not ask for."""
        events = []
        for c in out.outputs:
            reason = finish_reason(c.finish_reason) if c.finish_reason is not None else None
            text, logprobs = self.choices[(p, c.index)].delta(out, c.token_ids, c.text, c.logprobs)
            if not text and reason is None and not (logprobs and logprobs.tokens):
                continue
            index = p * self.n + c.index
            if logprobs is None:  # most chunks: text only
                events.append(self.template.completion(index, text, reason))
                continue
            chunk = CompletionResponse(
                id=self.request_id, created=self.created, model=self.req.model,
                system_fingerprint=SYSTEM_FINGERPRINT,
                choices=[CompletionChoice(index=index, text=text, logprobs=logprobs,
                                          finish_reason=reason)],  # type: ignore[arg-type]
            )
            events.append(format_event(chunk.model_dump_json(exclude=self.exclude)))
        return events

    def closing(self) -> list[bytes]:
        if not self.req.include_usage:
            return []
        chunk = CompletionResponse(
            id=self.request_id, created=self.created, model=self.req.model, system_fingerprint=SYSTEM_FINGERPRINT,
            choices=[], usage=self.serving._usage(self.streams),
        )
        return [format_event(chunk.model_dump_json())]
