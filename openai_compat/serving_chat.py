"""POST /v1/chat/completions: messages → chat template → engine → JSON or SSE chunks.

Streaming: each choice opens with a chunk {"role": "assistant", "content": ""}, then one
chunk per engine output that changed it, the last one carrying its finish_reason; with
`stream_options.include_usage` a chunk with `choices: []` and the usage follows, and
`data: [DONE]` always ends the stream, also after an error event.

With tools, or a model that thinks in tags, the answer is read for calls and thinking
(`chat_output`, `chat_format`; docs/tools.md): their deltas stream as OpenAI streams them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engine import ImageInput, PromptTooLongError, RequestOutput, SamplingParams
from openai_compat.chat_format import ChatFormat, apply_constraint
from openai_compat.chat_output import (
    ChoiceMessage,
    ChoiceReader,
    OutputReader,
    deltas,
    finish_reason_with_calls,
)
from openai_compat.errors import OpenAIError, from_exception, unsupported
from openai_compat.generation import (
    SYSTEM_FINGERPRINT,
    GenerationStream,
    finish_reason,
    make_usage,
    new_id,
    open_streams,
    push_events,
)
from openai_compat.images import ChatImages, fetch_parts, prepare_images, render_with_images
from openai_compat.logprobs import chat_logprobs
from openai_compat.media_fetch import MediaPolicy
from openai_compat.prompt_size import check_prompt_text
from openai_compat.protocol import (
    ChatChoiceLogprobs,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChatStreamChoice,
    DeltaMessage,
)
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
from openai_compat.tool_calls.constraints import compile_constraint, structured_output
from openai_compat.tool_calls.request import plan_tools


def template_messages(messages: list[ChatMessage], images: ChatImages | None = None) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: plain-text content, developer → system. With
    `images`, each `image_url` part is collected there and stands as the model's placeholder
    text in its message's content; without, it is refused."""
    out = []
    for i, message in enumerate(messages):
        if message.role == "function":
            raise OpenAIError("The 'function' role is not supported; use 'tool'.", param=f"messages[{i}].role")
        if message.role == "tool" and message.tool_call_id is None:
            raise OpenAIError("A 'tool' message needs the 'tool_call_id' it answers.", param=f"messages[{i}].tool_call_id")
        entry = message.model_dump(exclude_none=True)
        entry["role"] = "system" if message.role == "developer" else message.role
        content = message.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type == "text" and part.text is not None:
                    texts.append(part.text)
                elif part.type == "refusal" and part.refusal is not None:
                    texts.append(part.refusal)
                elif part.type == "image_url" and images is not None:
                    texts.append(images.add(part, f"messages[{i}].content[{j}]"))
                elif part.type in ("text", "refusal"):
                    raise OpenAIError(
                        f"A content part of type '{part.type}' needs its '{part.type}' field.",
                        param=f"messages[{i}].content[{j}].{part.type}",
                    )
                else:
                    raise OpenAIError(
                        f"Content parts of type '{part.type}' are not supported; only text.",
                        param=f"messages[{i}].content[{j}].type",
                        code="unsupported_parameter",
                    )
            content = "\n".join(texts)
        entry["content"] = content or ""
        out.append(entry)
    return out


# apply_chat_template's own parameters: a request's chat_template_kwargs may set template
# variables (e.g. enable_thinking), not the conversation, tools (the request's `tools` are)
# or how the call tokenizes and returns.
_RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "tokenize", "padding", "truncation", "max_length",
    "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs", "sanitize_control_tokens",
})


def check_chat_template_kwargs(kwargs: dict[str, Any] | None, trust_chat_template: bool) -> None:
    """400 for a template of the request's own unless the server trusts them (a Jinja template
    runs arbitrary loops on the server's one tokenizer thread), and for apply_chat_template's own
    parameters."""
    for key in kwargs or {}:
        if key == "chat_template" and not trust_chat_template:
            raise OpenAIError(
                "This server does not accept chat templates in requests (see --trust-request-chat-template).",
                param="chat_template_kwargs.chat_template",
            )
        if key in _RESERVED_TEMPLATE_KWARGS:
            raise OpenAIError(f"'{key}' cannot be set through chat_template_kwargs.", param=f"chat_template_kwargs.{key}")


def render_chat_prompt(
    tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool, kwargs: dict[str, Any] | None,
    check_text: Callable[[str], None] | None = None, tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """The chat template applied and tokenized (runs in a worker thread)."""
    return render_chat(tokenizer, messages, add_generation_prompt, kwargs, check_text, tools)[1]


def render_chat(
    tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool, kwargs: dict[str, Any] | None,
    check_text: Callable[[str], None] | None = None, tools: list[dict[str, Any]] | None = None,
) -> tuple[str, list[int]]:
    """The chat template applied (with `tools=` where given): its text and token ids (runs in a
    worker thread); `check_text` sees the rendered text before the tokenizer does."""
    options = {"add_generation_prompt": add_generation_prompt, **(kwargs or {})}
    options.pop("tokenize", None)
    if tools:
        options["tools"] = tools
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, **options)
    except Exception as e:  # template errors: role order, missing fields, no template at all
        raise OpenAIError(f"The chat template could not render these messages: {e}", param="messages") from None
    if check_text is not None:
        check_text(text)
    return text, list(tokenizer.encode(text, add_special_tokens=False))


class ChatServing:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    def chat_format(self, tokenizer: Any) -> ChatFormat:
        settings = self.state.settings
        return ChatFormat.of(tokenizer, settings.tool_call_parser, settings.reasoning_parser)

    async def _prompt(
        self, req: ChatCompletionRequest, params: SamplingParams
    ) -> tuple[list[int], OutputReader, list[ImageInput]]:
        """The prompt's token ids (each image's placeholders widened to its tokens), how its
        answer is read, and its images preprocessed. Tools and constraints are checked first;
        `params` get what reading the answer needs."""
        state = self.state
        tokenizer = state.chat_tokenizer(template_in_request="chat_template" in (req.chat_template_kwargs or {}))
        plan = plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls)
        chat_format = self.chat_format(tokenizer)
        constraint = structured_output(req, plan, chat_format.tool_format)
        processor = state.engine.image_processor
        settings = state.settings
        policy = MediaPolicy(tuple(settings.allowed_media_domains), settings.media_fetch_timeout, settings.max_image_bytes)
        images = ChatImages(processor.placeholder if processor else None, settings.max_images_per_request, policy)
        messages, tools = chat_format.conversation(
            template_messages(req.messages, images), plan, req.chat_template_kwargs
        )
        inputs: list[ImageInput] = []
        if images.parts:  # fetched (URLs), then decoded and preprocessed beside the tokenizer's thread
            parts = await fetch_parts(images.parts, policy)
            inputs = await asyncio.to_thread(prepare_images, parts, processor, settings.max_image_pixels)
        # A text far too long for the context is refused without tokenizing it. Checked on the
        # rendered prompt, not on the messages: a template may trim or drop their text (and a
        # request's own template may add any amount), but rendering costs little next to
        # tokenizing (docs/benchmarks.md, "Figures behind choices in the code").
        check_text = partial(
            check_prompt_text, bound=state.prompt_bound, max_model_len=state.engine.max_model_len,
            max_tokens=params.max_tokens,
        )
        # (with no image too: image tokens in the text are a 400 naming messages)
        render = partial(render_with_images, render_chat, processor, inputs) if processor else render_chat
        try:
            text, prompt_ids = await state.run_tokenizer(
                render, tokenizer, messages, req.add_generation_prompt, req.chat_template_kwargs,
                check_text=check_text, tools=tools,
            )
        except PromptTooLongError as e:
            raise from_exception(e, prompt_param="messages") from None
        reader = chat_format.reader(plan, text)
        if reader.active and chat_format.keeps_special_tokens(reader):
            params.skip_special_tokens = False
        if constraint is not None:
            constraint = replace(constraint, start_after=chat_format.start_after(text))
            await compile_constraint(state.engine, constraint, req, plan)  # a 400 if it cannot be enforced
            apply_constraint(params, constraint)
        return prompt_ids, reader, inputs

    async def create(self, request: Request) -> Response:
        state = self.state
        state.check_ready()
        req = await parse_body(request, ChatCompletionRequest)
        state.check_model(req.model)
        field = req.unsupported_field()
        if field is not None:
            raise unsupported(field)
        if req.top_logprobs is not None and not req.logprobs:
            raise OpenAIError("'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs")
        check_stream_options(req)
        check_num_sequences(state, req.n or 1, "n")
        check_chat_template_kwargs(req.chat_template_kwargs, state.settings.trust_request_chat_template)
        try:  # every check that needs no tokens, before the tokenizer's work
            params = build_sampling_params(
                req,
                max_tokens=req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens,
                logprobs=(req.top_logprobs or 0) if req.logprobs else None,
            )
        except ValueError as e:
            raise from_exception(e) from None
        prompt_ids, reader, images = await self._prompt(req, params)
        try:
            request_id = new_id("chatcmpl")
            streams = await run_until_disconnect(
                request, open_streams(state, [prompt_ids], params, request_id, images=images)
            )
        except ClientDisconnected:
            return Response(status_code=499)
        except Exception as e:
            raise from_exception(e, state.settings.retry_after_s) from None
        stream = streams[0]
        if req.stream:
            events = _ChatEvents(self, req, stream, request_id, reader)
            return push_events([stream], lambda _, out: events.events(out), events.closing, events.opening)
        try:
            response = await run_until_disconnect(request, self._collect(req, stream, request_id, reader))
        except ClientDisconnected:
            return Response(status_code=499)
        except Exception as e:
            raise from_exception(e, state.settings.retry_after_s) from None
        finally:
            await stream.close()
        return JSONResponse(response.model_dump())

    def _logprobs(self, req: ChatCompletionRequest, token_ids: list[int], entries: Any) -> ChatChoiceLogprobs | None:
        if not req.logprobs:
            return None
        content = chat_logprobs(self.state.engine.tokenizer, token_ids, entries or [], req.top_logprobs or 0)
        return ChatChoiceLogprobs(content=content)

    async def _collect(
        self, req: ChatCompletionRequest, stream: GenerationStream, request_id: str, reader: OutputReader
    ) -> ChatCompletionResponse:
        n = stream.params.n
        readers = [reader.choice() for _ in range(n)]
        messages = [ChoiceMessage() for _ in range(n)]
        token_ids: list[list[int]] = [[] for _ in range(n)]
        entries: list[list[Any]] = [[] for _ in range(n)]
        reasons = ["stop"] * n
        while (out := await stream.next_output()) is not None:
            for c in out.outputs:
                messages[c.index].add(readers[c.index].feed(c.text))
                token_ids[c.index].extend(c.token_ids)
                entries[c.index].extend(c.logprobs or [])
                if c.finish_reason is not None:
                    messages[c.index].add(readers[c.index].finish())
                    reasons[c.index] = finish_reason_with_calls(finish_reason(c.finish_reason), readers[c.index].num_calls)
        choices = [
            ChatCompletionChoice(
                index=i,
                message=messages[i].message(reads_reasoning=reader.reasoning is not None),
                logprobs=self._logprobs(req, token_ids[i], entries[i]),
                finish_reason=reasons[i],  # type: ignore[arg-type]
            )
            for i in range(n)
        ]
        return ChatCompletionResponse(
            id=request_id,
            created=int(time.time()),
            model=req.model,
            system_fingerprint=SYSTEM_FINGERPRINT,
            choices=choices,
            usage=make_usage(len(stream.prompt_ids), stream.num_generated_tokens, stream.num_cached_tokens),
        )


class _ChatEvents:
    """The SSE events of one streamed chat completion: each choice opens with a chunk
    {"role": "assistant", "content": ""}, then one chunk per engine output that changed it, the
    last one carrying its finish_reason; with `stream_options.include_usage` a usage chunk closes."""

    def __init__(
        self, serving: ChatServing, req: ChatCompletionRequest, stream: GenerationStream, request_id: str,
        reader: OutputReader,
    ) -> None:
        self.serving = serving
        self.req = req
        self.stream = stream
        self.request_id = request_id
        # Reading the answer for calls or thinking; None: plain content, written from a template.
        self.readers = [reader.choice() for _ in range(stream.params.n)] if reader.active else None
        self.created = int(time.time())
        self.exclude = None if req.include_usage else {"usage"}
        self.template = ChunkTemplate(
            ChatCompletionChunk(
                id=request_id, created=self.created, model=req.model, system_fingerprint=SYSTEM_FINGERPRINT,
                choices=[],
            ),
            self.exclude,
        )

    def _chunk(self, choice: ChatStreamChoice | None, usage: Any = None) -> bytes:
        payload = ChatCompletionChunk(
            id=self.request_id, created=self.created, model=self.req.model, system_fingerprint=SYSTEM_FINGERPRINT,
            choices=[choice] if choice is not None else [], usage=usage,
        )
        return format_event(payload.model_dump_json(exclude=self.exclude if usage is None else None))

    def opening(self) -> list[bytes]:
        return [
            self._chunk(ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content="")))
            for i in range(self.stream.params.n)
        ]

    def events(self, out: RequestOutput) -> list[bytes]:
        """One output's chunks; raises OpenAIError for an abort the client did not ask for."""
        if self.readers is not None:
            return self._read_events(out, self.readers)
        req = self.req
        events = []
        for c in out.outputs:
            reason = finish_reason(c.finish_reason) if c.finish_reason is not None else None
            if not c.text and reason is None and not (req.logprobs and c.token_ids):
                continue  # text held back (a partial character or a possible stop string)
            content = c.text if c.text or reason is None else None
            logprobs = self.serving._logprobs(req, c.token_ids, c.logprobs)
            if logprobs is None:  # most chunks: content only
                events.append(self.template.chat(c.index, content, reason))
                continue
            events.append(
                self._chunk(
                    ChatStreamChoice(
                        index=c.index,
                        delta=DeltaMessage(content=content),
                        logprobs=logprobs,
                        finish_reason=reason,  # type: ignore[arg-type]
                    )
                )
            )
        return events

    def _read_events(self, out: RequestOutput, readers: list[ChoiceReader]) -> list[bytes]:
        """Chunks of an answer read for calls or thinking: its text, then each call's pieces as
        OpenAI streams them; the output's logprobs on the first chunk, the finish_reason on the last."""
        events = []
        for c in out.outputs:
            reader = readers[c.index]
            pieces = deltas(reader.feed(c.text))
            reason = None
            if c.finish_reason is not None:
                pieces += deltas(reader.finish())
                reason = finish_reason_with_calls(finish_reason(c.finish_reason), reader.num_calls)
            if not pieces and reason is None and not (self.req.logprobs and c.token_ids):
                continue  # held back: a possible tag, or whitespace next to a call
            logprobs = self.serving._logprobs(self.req, c.token_ids, c.logprobs)
            pieces = pieces or [DeltaMessage()]
            for k, delta in enumerate(pieces):
                last = k == len(pieces) - 1
                choice = ChatStreamChoice(
                    index=c.index, delta=delta, logprobs=logprobs if k == 0 else None,
                    finish_reason=reason if last else None,  # type: ignore[arg-type]
                )
                events.append(self._chunk(choice))
        return events

    def closing(self) -> list[bytes]:
        if not self.req.include_usage:
            return []
        stream = self.stream
        return [self._chunk(None, make_usage(len(stream.prompt_ids), stream.num_generated_tokens, stream.num_cached_tokens))]
