"""The gateway's OpenAPI document. The POST endpoints read their bodies themselves (under a size limit,
with OpenAI-shaped errors), so FastAPI cannot see what they take or return: their request, response,
stream-chunk and error schemas are declared here from the same pydantic models the routes use."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from diptych.router.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
)

# path -> (request body, response, one streamed chunk)
POST_ENDPOINTS: dict[str, tuple[type[BaseModel], type[BaseModel], type[BaseModel]]] = {
    "/v1/chat/completions": (ChatCompletionRequest, ChatCompletionResponse, ChatCompletionChunk),
    "/v1/completions": (CompletionRequest, CompletionResponse, CompletionResponse),
}
ERRORS = {
    400: "invalid body, parameters or prompt (too long for the context or the KV cache)",
    401: "missing or invalid API key",
    404: "unknown model",
    413: "body larger than the gateway's limit",
    429: "too many requests in flight (Retry-After)",
    500: "the request failed inside the server",
    503: "no healthy workers, or the server is shutting down (Retry-After)",
    504: "the request took longer than the gateway's request timeout",
}


def install_openapi(app: FastAPI) -> None:
    """Make app.openapi() describe the POST endpoints' bodies and responses."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _document(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to customise it


def _document(app: FastAPI) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
    wanted: list[tuple[type[BaseModel], JsonSchemaMode]] = [(ErrorResponse, "serialization")]
    for request, response, chunk in POST_ENDPOINTS.values():
        wanted += [(request, "validation"), (response, "serialization"), (chunk, "serialization")]
    refs, defs = models_json_schema(list(dict.fromkeys(wanted)), ref_template="#/components/schemas/{model}")
    doc.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
    errors = {
        str(status): {
            "description": why,
            "content": {"application/json": {"schema": refs[(ErrorResponse, "serialization")]}},
        }
        for status, why in ERRORS.items()
    }
    for path, (request, response, chunk) in POST_ENDPOINTS.items():
        operation = doc["paths"][path]["post"]
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": refs[(request, "validation")]}},
        }
        operation["responses"] = {
            "200": {
                "description": "the completion; with stream: true, server-sent events, one chunk per "
                "`data:` line (an error object if the request fails mid-way), then `data: [DONE]`",
                "content": {
                    "application/json": {"schema": refs[(response, "serialization")]},
                    "text/event-stream": {"schema": refs[(chunk, "serialization")]},
                },
            },
            **errors,
        }
    return doc
