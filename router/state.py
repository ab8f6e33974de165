"""What every route of one gateway app shares: the backend, the tokenizer, settings, metrics, admission."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from diptych.engine.tokenizer import Tokenizer
from diptych.router.backend import GenerationBackend
from diptych.router.errors import APIError, retry_later
from diptych.router.metrics import GatewayMetrics
from diptych.router.settings import GatewaySettings


class Admission:
    """Counts requests in flight; a request over `max_pending` is refused rather than queued."""

    def __init__(self, max_pending: int) -> None:
        self.max_pending = max_pending
        self.pending = 0

    def try_acquire(self) -> bool:
        if self.pending >= self.max_pending:
            return False
        self.pending += 1
        return True

    def release(self) -> None:
        assert self.pending > 0, "release without acquire"
        self.pending -= 1


@dataclass(frozen=True)
class Gateway:
    backend: GenerationBackend
    tokenizer: Tokenizer
    settings: GatewaySettings
    metrics: GatewayMetrics
    admission: Admission
    # Set when the server's shutdown grace period runs out: what is still running ends with a 503.
    closing: asyncio.Event = field(default_factory=asyncio.Event)
    # Cleanups run as their own tasks so that a cancelled request still aborts its backend work;
    # asyncio keeps only weak references to tasks, hence this set.
    _background: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def model_names(self) -> tuple[str, ...]:
        return self.settings.model_names(self.backend.model_name)

    @property
    def timeout_s(self) -> float:
        return self.settings.request_timeout_s

    def resolve_model(self, requested: str | None) -> str:
        if requested is None:
            return self.model_names[0]
        if requested not in self.model_names:
            served = ", ".join(self.model_names)
            raise APIError(
                404,
                f"model '{requested}' does not exist; served: {served}",
                param="model",
                code="model_not_found",
            )
        return requested

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def retry_later(self, status: int, message: str) -> APIError:
        return retry_later(status, message, self.settings.retry_after_s)
