"""The gateway's backend over the Ray pools: route, reserve on decode, start prefill (which streams the KV
and the first token straight to decode), and stream tokens from the decode worker.

The gateway is out of the KV lifecycle: it never relays a token between workers, and decode tells
prefill directly when the KV has landed. It reads the controller's view (loads, dead workers) every
VIEW_PERIOD_S and counts its own placements in between, so routing costs no remote call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import replace

from diptych.cluster.clients import ControllerClient, WorkerDied
from diptych.engine.messages import (
    DeploymentView,
    FailureKind,
    GenerateRequest,
    LoadReport,
    PrefillResult,
    ReserveOutcome,
    TokenDelta,
    failed,
)
from diptych.router.backend import (
    BackendOverloadedError,
    BackendRejectedError,
    BackendUnavailableError,
    GenerationBackend,
    Phase,
)
from diptych.router.policy import NoWorkerError, RoutingPolicy

log = logging.getLogger(__name__)
VIEW_PERIOD_S = 0.25


class DisaggregatedBackend(GenerationBackend):
    def __init__(
        self, controller: ControllerClient, policy: RoutingPolicy, model_name: str, max_model_len: int
    ) -> None:
        super().__init__()
        self.controller = controller
        self.policy = policy
        self.model_name = model_name
        self.max_model_len = max_model_len
        self._view = DeploymentView((), (), -1)
        self._loads: dict[str, LoadReport] = {}  # the view's loads plus this gateway's placements since
        self._channels: set[tuple[str, str]] = set()  # pairs this gateway knows to be open
        self._placement: dict[str, tuple[str, str]] = {}  # request id -> (prefill id, decode id)
        self._refresh: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Read the controller's view now and keep it fresh on the running loop (generate calls it on a
        loop where the view is not kept fresh yet)."""
        await self.refresh_view()
        self._refresh = asyncio.ensure_future(self._refresh_loop())

    async def close(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh

    async def refresh_view(self) -> None:
        view = await self.controller.view()
        if view.version != self._view.version:
            self._channels.clear()  # a channel may have been forgotten or its worker died: ask again
        self._view = view
        self._loads = {r.worker_id: r for r in view.loads}  # the reports count what reached the workers

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(VIEW_PERIOD_S)
            try:
                await self.refresh_view()
            except Exception:  # the controller is busy or restarting: keep the last view
                log.exception("could not read the controller's view")

    def _live(self, role: str) -> list[LoadReport]:
        return [r for r in self._loads.values() if r.role == role]

    def _route(self, request: GenerateRequest) -> tuple[str, str]:
        try:
            return self.policy.choose(self._live("prefill"), self._live("decode"), request)
        except NoWorkerError as e:
            raise BackendUnavailableError(str(e)) from None

    async def _ensure_channel(self, p: str, d: str) -> None:
        if (p, d) not in self._channels:
            await self.controller.ensure_channel(p, d)
            self._channels.add((p, d))

    async def _forget_channel(self, p: str, d: str) -> None:
        self._channels.discard((p, d))
        await self.controller.forget_channel(p, d)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        if self._refresh is None or self._refresh.done():  # first request, or a new event loop
            await self.start()
        rid = request.request_id
        p, d = self._route(request)
        prefill, decode = self.controller.prefill(p), self.controller.decode(d)
        self._placement[rid] = (p, d)
        self._count(p, d, +1)
        finished = False
        prefilling: asyncio.Task[PrefillResult] | None = None
        try:
            await self._ensure_channel(p, d)
            reserved = await decode.reserve(request, p)
            if reserved.outcome in (ReserveOutcome.REJECTED, ReserveOutcome.DUPLICATE_ID):
                raise BackendRejectedError(reserved.message)
            if not reserved.reserved:
                raise BackendOverloadedError(f"decode worker {d} has no free KV blocks ({reserved.message})")
            prefilling = asyncio.ensure_future(prefill.prefill(request, d))
            tokens = decode.stream(rid)
            async for delta, from_prefill in _until_prefill_fails(tokens, prefilling):
                if from_prefill:  # the prefill failed: free the decode reservation now, not at its deadline
                    await self._abort_on(rid, p, d)
                if delta.failure is FailureKind.KV_CHANNEL:  # the pair's channel broke: the next request
                    await self._forget_channel(p, d)  # on it opens a new one
                if delta.queue_s is not None:
                    self.report_timing(Phase.QUEUE, delta.queue_s)
                if delta.kv_transfer_s is not None:
                    self.report_timing(Phase.KV_TRANSFER, delta.kv_transfer_s)
                finished = delta.finished
                yield delta
                if finished:
                    return
        except WorkerDied as e:
            await self.controller.mark_dead(e.worker_id)
            log.error("request %s lost its worker %s", rid, e.worker_id)
            finished = True
            yield failed(rid, FailureKind.WORKER_DIED, f"worker {e.worker_id} died")
        finally:
            if prefilling is not None and not prefilling.done():
                prefilling.cancel()
            self._count(p, d, -1)
            self._placement.pop(rid, None)
            if not finished:
                await self._abort_on(rid, p, d)

    async def abort(self, request_id: str) -> None:
        placement = self._placement.get(request_id)
        if placement is not None:
            await self._abort_on(request_id, *placement)

    async def _abort_on(self, rid: str, p: str, d: str) -> None:
        prefill, decode = self.controller.prefill(p), self.controller.decode(d)
        calls = [w.abort(rid) for w in (prefill, decode) if w.worker_id not in self._view.dead]
        if p not in self._view.dead:
            calls.append(prefill.release(rid))
        await asyncio.gather(*calls, return_exceptions=True)

    def _count(self, p: str, d: str, step: int) -> None:
        """Count a placement in the cached load at once, so a burst spreads before the view refreshes."""
        for wid in (p, d):
            report = self._loads.get(wid)
            if report is not None:
                self._loads[wid] = replace(report, waiting=max(0, report.waiting + step))

    def load(self) -> list[LoadReport]:
        return list(self._view.loads)

    async def check_health(self) -> bool:
        return bool(self._live("prefill")) and bool(self._live("decode"))


async def _until_prefill_fails(
    tokens: AsyncIterator[TokenDelta], prefilling: asyncio.Task[PrefillResult]
) -> AsyncIterator[tuple[TokenDelta, bool]]:
    """The decode stream's deltas, unless the prefill fails first: then its error, as the last delta; each
    with whether it came from the prefill (the caller aborts the decode side then)."""
    next_delta: asyncio.Future[TokenDelta] | None = None
    watch: asyncio.Future[PrefillResult] | None = prefilling
    try:
        while True:
            if next_delta is None:
                next_delta = asyncio.ensure_future(anext(tokens))
            waiting: set[asyncio.Future[object]] = {next_delta}  # type: ignore[arg-type]
            if watch is not None:
                waiting.add(watch)  # type: ignore[arg-type]
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if watch is not None and watch.done():
                result = watch.result()  # a dead prefill worker raises WorkerDied here
                watch = None
                if not result.ok:
                    assert result.error is not None and result.failure is not None
                    yield failed(result.request_id, result.failure, result.error), True
                    return
            if next_delta.done():
                try:
                    delta = next_delta.result()
                except StopAsyncIteration:
                    return
                next_delta = None
                yield delta, False
    finally:
        if next_delta is not None and not next_delta.done():
            next_delta.cancel()
