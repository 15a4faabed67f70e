"""The server's own OpenAPI 3.1 document, generated from the pydantic schemas it validates with."""

from __future__ import annotations

from collections.abc import Mapping
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
    "400": "Invalid request (the field is named in `error.param`), or a body not sent as application/json",
    "401": "Missing or wrong API key",
    "404": "Unknown model",
    "429": "Too many waiting requests; see Retry-After",
    "503": "The model is loading, the engine is unavailable, or the server is shutting down",
}


class _Operations:
    """The document's operations, their bodies referring to the shared schemas in `refs`."""

    def __init__(self, refs: Mapping[tuple[Any, JsonSchemaMode], Any]) -> None:
        self.refs = refs
        self.errors = {
            status: {"description": text, **_json_body(self.ref(ErrorResponse, "serialization"))}
            for status, text in _ERRORS.items()
        }

    def ref(self, model: type[BaseModel], mode: JsonSchemaMode) -> dict[str, Any]:
        return dict(self.refs[(model, mode)])

    def generation(self, request: type[BaseModel], response: type[BaseModel], chunk: type[BaseModel]) -> dict[str, Any]:
        """A POST answered with JSON, or with server-sent events of `chunk` when streamed."""
        return {
            "post": {
                "requestBody": {"required": True, **_json_body(self.ref(request, "validation"))},
                "responses": {
                    "200": {
                        "description": "The response, or with `stream: true` server-sent events "
                        "(`data: {chunk}`, then `data: [DONE]`)",
                        "content": {
                            "application/json": {"schema": self.ref(response, "serialization")},
                            "text/event-stream": {"schema": self.ref(chunk, "serialization")},
                        },
                    },
                    **self.errors,
                },
            }
        }

    def simple(self, method: str, response: type[BaseModel], request: type[BaseModel] | None = None) -> dict[str, Any]:
        operation: dict[str, Any] = {
            "responses": {"200": {"description": "OK", **_json_body(self.ref(response, "serialization"))}, **self.errors}
        }
        if request is not None:
            operation["requestBody"] = {"required": True, **_json_body(self.ref(request, "validation"))}
        return {method: operation}


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _paths(ops: _Operations) -> dict[str, Any]:
    text = {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}
    model_param = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
    return {
        "/v1/chat/completions": ops.generation(ChatCompletionRequest, ChatCompletionResponse, ChatCompletionChunk),
        "/v1/completions": ops.generation(CompletionRequest, CompletionResponse, CompletionResponse),
        "/v1/models": ops.simple("get", ModelList),
        "/v1/models/{model}": {"get": {"parameters": [model_param], **ops.simple("get", ModelCard)["get"]}},
        "/tokenize": ops.simple("post", TokenizeResponse, TokenizeRequest),
        "/detokenize": ops.simple("post", DetokenizeResponse, DetokenizeRequest),
        "/health": {"get": {"responses": {"200": {"description": "Ready"}, "503": {"description": "Not ready"}}}},
        "/metrics": {"get": {"responses": {"200": text}}},
        "/version": {"get": {"responses": {"200": {"description": "The server version"}}}},
    }


@cache
def openapi_document(version: str) -> dict[str, Any]:
    inputs: list[tuple[type[BaseModel], JsonSchemaMode]] = [(m, "validation") for m in _REQUESTS]
    outputs: list[tuple[type[BaseModel], JsonSchemaMode]] = [(m, "serialization") for m in _RESPONSES]
    refs, top = models_json_schema([*inputs, *outputs], ref_template="#/components/schemas/{model}")
    return {
        "openapi": "3.1.0",
        "info": {"title": "lightgate", "version": version,
                 "description": "An OpenAI-compatible LLM server with its own inference engine."},
        "paths": _paths(_Operations(refs)),
        "components": {
            "schemas": top.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
