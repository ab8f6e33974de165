"""Typed facades over the Ray actor handles of a deployment: the controller, prefill and decode workers.

Every remote call a gateway or the controller makes goes through one of these, so a reader (and a type
checker) can follow it to the worker method it lands in, and a dead actor surfaces as `WorkerDied` naming
the worker, never as an error string to parse.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import ray

from diptych.engine.messages import (
    ChannelSpec,
    DeploymentView,
    GenerateRequest,
    LoadReport,
    PrefillResult,
    ReserveResult,
    TokenDelta,
    WorkerRef,
)

T = TypeVar("T")
CONTROLLER_NAME = "diptych-controller"
NAMESPACE = "diptych"  # named actors are found across processes (a second gateway) within one namespace


class WorkerDied(RuntimeError):
    """A remote call found its actor dead (or it died during the call)."""

    def __init__(self, worker_id: str, cause: BaseException) -> None:
        super().__init__(f"worker {worker_id} died: {cause}")
        self.worker_id = worker_id


def actor_name(worker_id: str) -> str:
    return f"diptych-{worker_id}"


class _ActorClient:
    def __init__(self, worker_id: str, handle: Any) -> None:
        self.worker_id = worker_id
        self.handle = handle

    async def _call(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except ray.exceptions.RayActorError as e:
            raise WorkerDied(self.worker_id, e) from None

    async def load(self) -> LoadReport:
        return await self._call(self.handle.load.remote())

    async def healthy(self) -> bool:
        return await self._call(self.handle.healthy.remote())

    async def abort(self, request_id: str) -> None:
        await self._call(self.handle.abort.remote(request_id))


class PrefillClient(_ActorClient):
    """prefill/worker.py: PrefillWorker."""

    async def prefill(self, request: GenerateRequest, decode_id: str) -> PrefillResult:
        return await self._call(self.handle.prefill.remote(request, decode_id))

    async def release(self, request_id: str) -> None:
        await self._call(self.handle.release.remote(request_id))

    async def open_sender(self, decode_id: str, channel: ChannelSpec) -> None:
        await self._call(self.handle.open_sender.remote(decode_id, channel))

    async def set_stream_layers(self, stream: bool) -> None:
        await self._call(self.handle.set_stream_layers.remote(stream))


class DecodeClient(_ActorClient):
    """decode/worker.py: DecodeWorker."""

    async def reserve(self, request: GenerateRequest, prefill_id: str) -> ReserveResult:
        return await self._call(self.handle.reserve.remote(request, prefill_id))

    async def stream(self, request_id: str) -> AsyncIterator[TokenDelta]:
        try:
            async for ref in self.handle.stream.options(num_returns="streaming").remote(request_id):
                delta: TokenDelta = await ref
                yield delta
        except ray.exceptions.RayActorError as e:
            raise WorkerDied(self.worker_id, e) from None

    async def open_receiver(self, prefill: PrefillClient) -> ChannelSpec:
        return await self._call(self.handle.open_receiver.remote(prefill.worker_id, prefill.handle))

    async def drop_channel(self, prefill_id: str) -> bool:
        return await self._call(self.handle.drop_channel.remote(prefill_id))


class ControllerClient:
    """cluster/controller.py: Controller, the deployment's one named actor."""

    def __init__(self, handle: Any, workers: list[WorkerRef]) -> None:
        self.handle = handle
        self._prefill = {
            w.worker_id: PrefillClient(w.worker_id, w.handle) for w in workers if w.role == "prefill"
        }
        self._decode = {
            w.worker_id: DecodeClient(w.worker_id, w.handle) for w in workers if w.role == "decode"
        }

    @classmethod
    async def connect(cls, handle: Any) -> ControllerClient:
        return cls(handle, await handle.workers.remote())

    @classmethod
    async def find(cls) -> ControllerClient:
        """The running deployment's controller, from any process attached to its Ray cluster."""
        try:
            handle = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
        except ValueError:
            raise RuntimeError(
                f"no diptych deployment on this Ray cluster (no actor {CONTROLLER_NAME!r} in namespace "
                f"{NAMESPACE!r}): start one with `diptych up`"
            ) from None
        return await cls.connect(handle)

    def prefill(self, worker_id: str) -> PrefillClient:
        return self._prefill[worker_id]

    def decode(self, worker_id: str) -> DecodeClient:
        return self._decode[worker_id]

    def worker(self, worker_id: str) -> PrefillClient | DecodeClient:
        return self._prefill.get(worker_id) or self._decode[worker_id]

    async def view(self) -> DeploymentView:
        return await self.handle.view.remote()

    async def ensure_channel(self, prefill_id: str, decode_id: str) -> None:
        await self.handle.ensure_channel.remote(prefill_id, decode_id)

    async def channel(self, prefill_id: str, decode_id: str) -> ChannelSpec | None:
        return await self.handle.channel.remote(prefill_id, decode_id)

    async def forget_channel(self, prefill_id: str, decode_id: str) -> None:
        await self.handle.forget_channel.remote(prefill_id, decode_id)

    async def mark_dead(self, worker_id: str) -> None:
        await self.handle.mark_dead.remote(worker_id)


__all__ = [
    "CONTROLLER_NAME",
    "NAMESPACE",
    "ControllerClient",
    "DecodeClient",
    "PrefillClient",
    "WorkerDied",
    "actor_name",
]
