"""Every failure leaves the gateway in the OpenAI error shape: {"error": {message, type, param, code}}."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

# OpenAI's error type for each status we send.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


@dataclass
class APIError(Exception):
    """Raised anywhere in request handling; becomes one HTTP error response."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict[str, Any]:
        kind = _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def retry_later(status: int, message: str, retry_after_s: int) -> APIError:
    code = "rate_limit_exceeded" if status == 429 else "service_unavailable"
    return APIError(status, message, code=code, headers={"Retry-After": str(retry_after_s)})


def from_validation_errors(errors: Sequence[Any]) -> APIError:
    """A 400 naming the first offending field, from pydantic's (or FastAPI's) error list."""
    first = errors[0]
    loc = [part for part in first["loc"] if part != "body" and not _is_union_tag(part)]
    path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    if first["type"] == "missing":
        message = f"missing required field '{path}'"
    elif first["type"] == "value_error":
        message = f"invalid value for '{path}': {first['ctx']['error']}"
    else:
        message = f"invalid value for '{path}': {first['msg']}"
    return bad_request(message, param=str(loc[0]) if loc else None)


# pydantic names the union member an error came from ("str", "list[int]", "TextPart") in its location.
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|\w+\[.*\]|[A-Z]\w*)$")


def _is_union_tag(part: object) -> bool:
    return isinstance(part, str) and bool(_UNION_TAG.match(part))


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception type the app can raise to an OpenAI-shaped response."""

    async def on_api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return exc.response()

    async def on_validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, (RequestValidationError, ValidationError))
        return from_validation_errors(exc.errors()).response()

    async def on_http(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return APIError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {})).response()

    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in the gateway", exc_info=exc)
        return APIError(500, f"internal error: {type(exc).__name__}").response()

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(ValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)
