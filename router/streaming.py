"""Server-sent events: `data: {json}` per chunk, an error event if a request fails mid-way, then `[DONE]`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from pydantic import BaseModel

from diptych.router.errors import APIError
from diptych.router.lifecycle import TextDelta
from diptych.router.render import Renderer

DONE = "data: [DONE]\n\n"


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


async def sse_stream(
    first: TextDelta, rest: AsyncIterator[TextDelta], renderer: Renderer, include_usage: bool
) -> AsyncIterator[str]:
    """The whole event stream of one request whose first delta has already arrived."""

    def encode(chunk: BaseModel) -> str:
        return sse(chunk.model_dump_json(exclude=None if include_usage else {"usage"}))

    for chunk in renderer.opening_chunks():
        yield encode(chunk)
    try:
        delta: TextDelta | None = first
        while delta is not None:
            yield encode(renderer.chunk(delta))
            if delta.usage is not None and include_usage:
                yield encode(renderer.usage_chunk(delta.usage))
            delta = await anext(rest, None)
    except APIError as e:
        yield sse(json.dumps(e.body()))
    yield DONE
