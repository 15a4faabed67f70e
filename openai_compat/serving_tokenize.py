"""POST /tokenize and /detokenize, as vLLM serves them.

/tokenize takes a `prompt` (tokenized as /v1/completions does) or `messages` and `tools`
(rendered with the chat template as /v1/chat/completions does, each image of a vision-language
model's chat as the tokens it takes) and returns the ids, their count and the context length;
/detokenize turns `tokens` back into text.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from openai_compat.chat_format import ChatFormat
from openai_compat.errors import OpenAIError
from openai_compat.images import ChatImages, fetch_parts, prepare_images, render_with_images
from openai_compat.media_fetch import MediaPolicy
from openai_compat.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from openai_compat.request_parsing import parse_body
from openai_compat.server_state import ServerState
from openai_compat.serving_chat import check_chat_template_kwargs, render_chat, template_messages
from openai_compat.tool_calls.request import plan_tools


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.server
    state.check_ready()
    return state


async def tokenize(request: Request) -> Response:
    state = _state(request)
    req = await parse_body(request, TokenizeRequest)
    state.check_model(req.model)
    if req.messages is not None:
        if not req.messages:
            raise OpenAIError("'messages' must not be empty.", param="messages")
        tokenizer = state.chat_tokenizer("chat_template" in (req.chat_template_kwargs or {}))
        check_chat_template_kwargs(req.chat_template_kwargs, state.settings.trust_request_chat_template)
        settings = state.settings
        chat_format = ChatFormat.of(tokenizer, settings.tool_call_parser, settings.reasoning_parser)
        # a chat's images as /v1/chat/completions reads them: the count is its prompt_tokens
        processor = state.engine.image_processor
        policy = MediaPolicy(tuple(settings.allowed_media_domains), settings.media_fetch_timeout, settings.max_image_bytes)
        images = ChatImages(processor.placeholder if processor else None, settings.max_images_per_request, policy)
        messages, tools = chat_format.conversation(
            template_messages(req.messages, images), plan_tools(req.tools), req.chat_template_kwargs
        )
        render: Any = render_chat
        if images.parts:
            parts = await fetch_parts(images.parts, policy)
            inputs = await asyncio.to_thread(prepare_images, parts, processor, settings.max_image_pixels)
            render = partial(render_with_images, render_chat, processor, inputs)
        _, ids = await state.run_tokenizer(
            render, tokenizer, messages, req.add_generation_prompt, req.chat_template_kwargs, tools=tools
        )
    elif req.prompt is not None:
        tokenizer = state.tokenizer
        ids = await state.run_tokenizer(tokenizer.encode, req.prompt, add_special_tokens=req.add_special_tokens)
    else:
        raise OpenAIError("Either 'prompt' or 'messages' is required.", param="prompt")
    body = TokenizeResponse(count=len(ids), max_model_len=state.engine.max_model_len, tokens=list(ids))
    return JSONResponse(body.model_dump())


async def detokenize(request: Request) -> Response:
    state = _state(request)
    req = await parse_body(request, DetokenizeRequest)
    state.check_model(req.model)
    tokenizer = state.tokenizer
    if any(not 0 <= t < len(tokenizer) for t in req.tokens):
        raise OpenAIError(f"Token ids must be in [0, {len(tokenizer)}).", param="tokens")
    text = await state.run_tokenizer(tokenizer.decode, req.tokens)
    return JSONResponse(DetokenizeResponse(prompt=str(text)).model_dump())
