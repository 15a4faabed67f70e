"""Errors in OpenAI's envelope: `{"error": {"message", "type", "param", "code"}}`.

Everything a client can get wrong is a 400 naming the field in `param`, never a 422 or 500.
`from_exception` maps the engine's errors and pydantic's validation errors onto statuses.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from pydantic import ValidationError
from starlette.responses import JSONResponse

from engine import EngineDeadError, EngineOverloadedError, PromptTooLongError
from openai_compat.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Names pydantic puts into an error's location for the branch of a union it tried.
_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


class OpenAIError(Exception):
    """An error response: raise it anywhere in a handler, the app turns it into JSON."""

    def __init__(
        self,
        message: str,
        status_code: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        info = ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=info).model_dump()

    def sse_data(self) -> str:
        """The error as a stream event's data: what a stream ends with when it fails mid-way."""
        return json.dumps(self.body(), ensure_ascii=False)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


def invalid_json() -> OpenAIError:
    return OpenAIError(
        "We could not parse the JSON body of your request. The API expects a JSON payload "
        "(Content-Type: application/json) holding an object.",
        code="invalid_json",
    )


def unsupported_content_type(content_type: str | None) -> OpenAIError:
    """A body that is not declared JSON: refused as OpenAI refuses it (400), whatever it holds."""
    given = f"Content-Type '{content_type}'" if content_type else "no Content-Type header"
    return OpenAIError(
        f"Unsupported content type: the request has {given}, and this endpoint accepts only "
        "'application/json' bodies. Send the header 'Content-Type: application/json'.",
        code="unsupported_content_type",
    )


def model_not_found(model: str) -> OpenAIError:
    return OpenAIError(
        f"The model `{model}` does not exist.", status_code=404, param="model", code="model_not_found"
    )


def unsupported(field: str) -> OpenAIError:
    return OpenAIError(
        f"'{field}' is not supported by this server.", param=field, code="unsupported_parameter"
    )


def invalid_api_key() -> OpenAIError:
    return OpenAIError(
        "Incorrect API key provided. Pass a configured key as `Authorization: Bearer <key>`.",
        status_code=401,
        code="invalid_api_key",
    )


def body_too_large(limit: int) -> OpenAIError:
    return OpenAIError(
        f"The request body is larger than this server accepts ({limit} bytes at most; see --max-request-body-bytes).",
        status_code=413,
        code="request_too_large",
    )


def not_ready(message: str) -> OpenAIError:
    return OpenAIError(message, status_code=503, type="server_error", code="service_unavailable")


def loc_to_param(loc: tuple[int | str, ...]) -> str:
    """pydantic's error location as OpenAI names params: ('messages', 0, 'role') -> messages[0].role."""
    param = ""
    for part in loc:
        if isinstance(part, int):
            param += f"[{part}]"
        elif _IDENTIFIER.match(part) and part not in _UNION_TAGS:
            param += f".{part}" if param else part
        # anything else names a union branch or a validator, not a field
    return param


def from_validation_error(error: ValidationError) -> OpenAIError:
    first = error.errors(include_url=False)[0]
    param = loc_to_param(tuple(first["loc"]))
    message = first["msg"]
    if param:
        message = f"Invalid value for '{param}': {message}"
        if first["type"] == "missing":
            message = f"Missing required parameter: '{param}'."
    return OpenAIError(message, param=param or None, code="invalid_value" if param else None)


def from_exception(exc: BaseException, retry_after_s: int = 1, prompt_param: str = "messages") -> OpenAIError:
    """The client-facing error for anything a handler raised."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, ValidationError):
        return from_validation_error(exc)
    if isinstance(exc, PromptTooLongError):
        return OpenAIError(exc.describe(prompt_param), param=prompt_param, code="context_length_exceeded")
    if isinstance(exc, ValueError):
        # The engine raises ValueError(message, field) for bad input.
        args = exc.args
        message = str(args[0]) if args else "Invalid request."
        param = args[1] if len(args) > 1 and isinstance(args[1], str) else None
        return OpenAIError(message, param=param, code="invalid_value")
    if isinstance(exc, EngineOverloadedError):
        return OpenAIError(
            "The server is overloaded: too many requests are waiting. Please retry later.",
            status_code=429,
            type="requests",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(retry_after_s)},
        )
    if isinstance(exc, EngineDeadError):
        return not_ready(f"The inference engine is not available: {exc}")
    logger.error("unexpected error", exc_info=exc)
    return OpenAIError(
        "The server had an error while processing your request.", status_code=500, type="server_error"
    )
