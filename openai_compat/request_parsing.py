"""A request's body and fields, as chat and completions read them before the engine sees them.

`parse_body` validates the JSON body against a protocol model (strict JSON types, 400 naming
the field); the checks refuse what the server could never serve with a 400 rather than a 429;
`build_sampling_params` turns OpenAI's sampling fields into the engine's `SamplingParams`.
"""

from __future__ import annotations

import re
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request

from engine import RequestOutputKind, SamplingParams
from openai_compat.errors import OpenAIError, from_validation_error, invalid_json, unsupported_content_type
from openai_compat.protocol import SamplingFields
from openai_compat.server_state import ServerState

M = TypeVar("M", bound=BaseModel)

_TOKEN_ID_KEY = re.compile(r"-?[0-9]{1,18}")  # ASCII digits only: int() also takes "5_0", " 5", "١٢"


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
