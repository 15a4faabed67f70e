"""The server's own OpenAPI 3.1 document, generated from the pydantic schemas it validates with."""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from openai_compat.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)

_REQUESTS: list[type[BaseModel]] = [ChatCompletionRequest, CompletionRequest, TokenizeRequest, DetokenizeRequest]
_RESPONSES: list[type[BaseModel]] = [
    ChatCompletionResponse, ChatCompletionChunk, CompletionResponse, ModelList, ModelCard,
    TokenizeResponse, DetokenizeResponse, ErrorResponse,
]
_ERRORS = {
    "400": "Invalid request (the field is named in `error.param`)",
    "401": "Missing or wrong API key",
    "404": "Unknown model",
    "429": "Too many waiting requests; see Retry-After",
    "503": "The model is loading, the engine is unavailable, or the server is shutting down",
}


@cache
def openapi_document(version: str) -> dict[str, Any]:
    inputs: list[tuple[type[BaseModel], JsonSchemaMode]] = [(m, "validation") for m in _REQUESTS]
    outputs: list[tuple[type[BaseModel], JsonSchemaMode]] = [(m, "serialization") for m in _RESPONSES]
    refs, top = models_json_schema([*inputs, *outputs], ref_template="#/components/schemas/{model}")

    def ref(model: type[BaseModel], mode: JsonSchemaMode) -> dict[str, Any]:
        return dict(refs[(model, mode)])

    def json_body(schema: dict[str, Any]) -> dict[str, Any]:
        return {"content": {"application/json": {"schema": schema}}}

    errors = {status: {"description": text, **json_body(ref(ErrorResponse, "serialization"))}
              for status, text in _ERRORS.items()}

    def generation(request: type[BaseModel], response: type[BaseModel], chunk: type[BaseModel]) -> dict[str, Any]:
        return {
            "post": {
                "requestBody": {"required": True, **json_body(ref(request, "validation"))},
                "responses": {
                    "200": {
                        "description": "The response, or with `stream: true` server-sent events "
                        "(`data: {chunk}`, then `data: [DONE]`)",
                        "content": {
                            "application/json": {"schema": ref(response, "serialization")},
                            "text/event-stream": {"schema": ref(chunk, "serialization")},
                        },
                    },
                    **errors,
                },
            }
        }

    def simple(method: str, response: type[BaseModel], request: type[BaseModel] | None = None) -> dict[str, Any]:
        operation: dict[str, Any] = {
            "responses": {"200": {"description": "OK", **json_body(ref(response, "serialization"))}, **errors}
        }
        if request is not None:
            operation["requestBody"] = {"required": True, **json_body(ref(request, "validation"))}
        return {method: operation}

    text = {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "lightgate", "version": version,
                 "description": "An OpenAI-compatible LLM server with its own inference engine."},
        "paths": {
            "/v1/chat/completions": generation(ChatCompletionRequest, ChatCompletionResponse, ChatCompletionChunk),
            "/v1/completions": generation(CompletionRequest, CompletionResponse, CompletionResponse),
            "/v1/models": simple("get", ModelList),
            "/v1/models/{model}": {
                "get": {
                    "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
                    **simple("get", ModelCard)["get"],
                }
            },
            "/tokenize": simple("post", TokenizeResponse, TokenizeRequest),
            "/detokenize": simple("post", DetokenizeResponse, DetokenizeRequest),
            "/health": {"get": {"responses": {"200": {"description": "Ready"}, "503": {"description": "Not ready"}}}},
            "/metrics": {"get": {"responses": {"200": text}}},
            "/version": {"get": {"responses": {"200": {"description": "The server version"}}}},
        },
        "components": {
            "schemas": top.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
