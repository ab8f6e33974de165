"""One request's trip through the backend: admit, detokenize, cut at stop strings, time, always clean up.

Both endpoints and both response modes consume the same stream of `TextDelta`s; the last one carries
the finish reason and the usage. However the stream ends (finish, stop string, client gone, timeout,
error), the admission slot is released and an unfinished backend request is aborted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

from diptych.engine.detokenizer import IncrementalDetokenizer
from diptych.engine.messages import FinishReason, GenerateRequest, TokenDelta
from diptych.router.backend import BackendOverloadedError, BackendRejectedError, BackendUnavailableError
from diptych.router.errors import APIError, bad_request
from diptych.router.state import Gateway

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TextDelta:
    text: str
    token_ids: tuple[int, ...]  # the tokens this text came from (after a stop string: none)
    logprobs: tuple[float, ...] | None
    finish_reason: str | None = None  # "stop" or "length", on the last delta only
    usage: Usage | None = None  # on the last delta only


async def generate_text(
    gw: Gateway, request: GenerateRequest, arrived: float
) -> AsyncGenerator[TextDelta, None]:
    """Run `request` on the backend; `arrived` is the monotonic time the HTTP request came in."""
    if not gw.admission.try_acquire():
        raise gw.retry_later(429, f"server busy: {gw.admission.max_pending} requests already in flight")
    gw.metrics.in_flight.inc()
    deltas: AsyncIterator[TokenDelta] | None = None
    backend_done = False
    try:
        progress = _Progress(gw, request, arrived)
        deltas = gw.backend.generate(request)
        async for delta in deltas:
            backend_done = delta.finished
            out = progress.step(delta)
            yield out
            if out.finish_reason is not None:
                return
        raise APIError(500, "the backend ended the request without a finish reason")
    except BackendUnavailableError as e:
        raise gw.retry_later(503, f"backend unavailable: {e}") from e
    except BackendOverloadedError as e:
        raise gw.retry_later(429, f"backend overloaded: {e}") from e
    except BackendRejectedError as e:
        raise bad_request(str(e)) from e
    except APIError:
        raise
    except Exception as e:
        logger.exception("request %s failed in the backend", request.request_id)
        raise APIError(500, f"backend failed: {type(e).__name__}: {e}") from e
    finally:
        if deltas is not None and not backend_done:  # stop string, client gone, timeout: free the workers
            gw.spawn(_abort(gw, request.request_id, deltas))
        gw.metrics.in_flight.dec()
        gw.admission.release()


class _Progress:
    """Text, token counts and timings of one request as its deltas arrive."""

    def __init__(self, gw: Gateway, request: GenerateRequest, arrived: float) -> None:
        self._gw = gw
        self._detok = IncrementalDetokenizer(
            gw.tokenizer, request.prompt_token_ids, stop=request.sampling.stop
        )
        self._timer = _TokenTimer(gw, arrived)
        self._prompt_tokens = len(request.prompt_token_ids)
        self._completion_tokens = 0
        gw.metrics.prompt_tokens.inc(self._prompt_tokens)

    def step(self, delta: TokenDelta) -> TextDelta:
        self._raise_on_failure(delta)
        text, used = _feed(self._detok, delta.token_ids)
        self._completion_tokens += used
        self._timer.tokens(used)
        token_ids = delta.token_ids[:used]
        logprobs = delta.logprobs[:used] if delta.logprobs is not None else None
        finish = "stop" if self._detok.stopped else _finish_reason(delta)
        if finish is None:
            return TextDelta(text, token_ids, logprobs)
        self._timer.finished()
        usage = Usage(self._prompt_tokens, self._completion_tokens)
        return TextDelta(text + self._detok.flush(), token_ids, logprobs, finish, usage)

    def _raise_on_failure(self, delta: TokenDelta) -> None:
        if delta.finish_reason is FinishReason.ERROR or delta.error is not None:
            raise APIError(500, f"generation failed: {delta.error or 'unknown backend error'}")
        if delta.finish_reason is FinishReason.ABORT:
            raise self._gw.retry_later(503, "the request was aborted by the server")


def _feed(detok: IncrementalDetokenizer, token_ids: tuple[int, ...]) -> tuple[str, int]:
    """Text safe to emit and how many tokens were used: one at a time, so a stop string ends the count."""
    text = []
    for used, token_id in enumerate(token_ids, start=1):
        text.append(detok.add([token_id]))
        if detok.stopped:
            return "".join(text), used
    return "".join(text), len(token_ids)


def _finish_reason(delta: TokenDelta) -> str | None:
    if delta.finish_reason is None:
        return None
    return "length" if delta.finish_reason is FinishReason.LENGTH else "stop"


async def _abort(gw: Gateway, request_id: str, deltas: AsyncIterator[TokenDelta]) -> None:
    try:
        await gw.backend.abort(request_id)
    except Exception:
        logger.exception("aborting %s failed", request_id)
    if isinstance(deltas, AsyncGenerator):
        await deltas.aclose()


class _TokenTimer:
    """TTFT, inter-token gaps and end-to-end latency of one request."""

    def __init__(self, gw: Gateway, arrived: float) -> None:
        self._metrics = gw.metrics
        self._arrived = arrived
        self._last: float | None = None

    def tokens(self, count: int) -> None:
        if count == 0:
            return
        now = time.monotonic()
        self._metrics.generation_tokens.inc(count)
        if self._last is None:
            self._metrics.ttft.observe(now - self._arrived)
        else:  # a delta of k tokens after a gap g: k gaps of g / k
            for _ in range(count):
                self._metrics.tpot.observe((now - self._last) / count)
        self._last = now

    def finished(self) -> None:
        self._metrics.e2e.observe(time.monotonic() - self._arrived)
