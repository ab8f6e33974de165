"""Stop consuming a request's events when its client goes away or its time runs out.

A request can wait a long time between events (queueing, a long prefill), so the client is watched
concurrently rather than checked between events: a disconnect cancels the pending step at once,
which runs the source's cleanup (it aborts the backend request).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TypeVar

from starlette.requests import Request

from diptych.router.errors import APIError

T = TypeVar("T")
SHUTDOWN_MESSAGE = "the server is shutting down and this request did not finish within its grace period"


async def guarded(
    request: Request, source: AsyncGenerator[T, None], deadline: float, poll_s: float, closing: asyncio.Event
) -> AsyncIterator[T]:
    """Yield from `source` until it ends; end early if the client leaves; 504 past `deadline` (monotonic);
    503 once `closing` is set (the server's shutdown grace period ran out)."""
    watcher = asyncio.ensure_future(_wait_for_disconnect(request, poll_s))
    closed = asyncio.ensure_future(closing.wait())
    step: asyncio.Future[T] | None = None
    try:
        while True:
            step = asyncio.ensure_future(anext(source))
            done, _ = await asyncio.wait(
                {step, watcher, closed},
                timeout=deadline - time.monotonic(),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if step not in done:
                if watcher in done:
                    return
                if closed in done:
                    raise APIError(503, SHUTDOWN_MESSAGE, code="shutdown")
                raise APIError(504, "the request timed out", code="timeout")
            try:
                item = step.result()
            except StopAsyncIteration:
                return
            step = None
            yield item
    finally:
        watcher.cancel()
        closed.cancel()
        if step is not None and not step.done():
            step.cancel()  # runs the source's cleanup in the step's task, which survives our cancellation
        else:
            await source.aclose()


async def _wait_for_disconnect(request: Request, poll_s: float) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(poll_s)
