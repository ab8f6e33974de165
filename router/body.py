"""Read a JSON request body under a size limit: from Content-Length first, then counting as it arrives."""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.requests import Request

from diptych.router.errors import APIError, bad_request

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body is larger than {limit} bytes", code="request_too_large")


async def read_json_object(request: Request, limit: int) -> dict[str, Any]:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    body = bytearray()
    async for chunk in request.stream():  # a client may lie about, or omit, the length
        body += chunk
        if len(body) > limit:
            raise _too_large(limit)
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"malformed JSON body: {e}") from e
    except RecursionError:
        raise bad_request("malformed JSON body: nested too deeply") from None
    if not isinstance(value, dict):
        raise bad_request("the request body must be a JSON object")
    if _SURROGATE_ESCAPE.search(body) is None:  # raw UTF-8 cannot hold surrogates; only escapes can
        return value
    try:  # a lone one (a \ud800 escape without its pair) is no character: no tokenizer can encode it
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError as e:
        raise bad_request(
            f"the body holds an unpaired UTF-16 surrogate ({e.object[e.start : e.end]!a})"
        ) from None
    return value
