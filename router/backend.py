"""What the gateway needs from whatever generates tokens: one small interface.

The single-process engine and the Ray prefill/decode cluster both implement it, so the HTTP layer
never depends on worker internals. Backends speak token ids only; text is the gateway's job.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from enum import Enum

from diptych.engine.messages import GenerateRequest, LoadReport, TokenDelta


class BackendUnavailableError(RuntimeError):
    """The backend cannot take requests now (starting, draining, no live workers): HTTP 503."""


class BackendOverloadedError(RuntimeError):
    """The backend refuses a request for lack of capacity (queues full, no KV blocks): HTTP 429."""


class BackendRejectedError(ValueError):
    """The backend cannot ever serve this request as asked (e.g. it needs more KV than a worker has): 400."""


class Phase(str, Enum):
    """Request phases whose duration only the backend can see."""

    QUEUE = "queue"  # arrival at a worker until it is scheduled
    KV_TRANSFER = "kv_transfer"  # prefill's first KV send until the decode side has every layer


TimingListener = Callable[[Phase, float], None]


class GenerationBackend(ABC):
    """Generates tokens for tokenized requests; the gateway owns everything about text and HTTP.

    Subclasses set `model_name` and `max_model_len` and call `super().__init__()`.
    """

    model_name: str
    max_model_len: int  # prompt plus generated tokens, per request

    def __init__(self) -> None:
        self._timing_listeners: list[TimingListener] = []

    @abstractmethod
    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        """Stream the request's new tokens; the last delta carries a finish reason (an `async def` generator).

        A failure is a delta with `finish_reason=ERROR` and `error` set, or an exception:
        `BackendUnavailableError` / `BackendOverloadedError` before the first delta for requests the
        backend will not take. Closing the iterator early must not leak the request: the gateway
        calls `abort` as well, so both paths must be safe together.
        """

    @abstractmethod
    async def abort(self, request_id: str) -> None:
        """Stop the request and free its resources on every worker; a no-op for unknown ids."""

    @abstractmethod
    def load(self) -> list[LoadReport]:
        """The latest load of every worker, without a remote round trip (read on every /metrics)."""

    @abstractmethod
    async def check_health(self) -> bool:
        """Whether the backend can serve now; cheap enough to call on every request."""

    def add_timing_listener(self, listener: TimingListener) -> None:
        """Register a callback for the phase durations the backend reports (the gateway's metrics)."""
        self._timing_listeners.append(listener)

    def report_timing(self, phase: Phase, seconds: float) -> None:
        """Called by subclasses when a worker tells them how long a phase of a request took."""
        for listener in self._timing_listeners:
            listener(phase, seconds)
