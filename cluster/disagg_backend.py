"""The gateway's backend over the Ray pools: route, reserve on decode, prefill (streaming KV), then
stream tokens from the decode worker."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import replace

import ray

from diptych.cluster.controller import Controller
from diptych.engine.llm_engine import RequestError
from diptych.engine.messages import FinishReason, GenerateRequest, LoadReport, TokenDelta
from diptych.prefill.worker import channel_failed
from diptych.router.backend import (
    BackendOverloadedError,
    BackendRejectedError,
    BackendUnavailableError,
    GenerationBackend,
    Phase,
)
from diptych.router.policy import NoWorkerError, RoutingPolicy

log = logging.getLogger(__name__)


class DisaggregatedBackend(GenerationBackend):
    def __init__(
        self, controller: Controller, policy: RoutingPolicy, model_name: str, max_model_len: int
    ) -> None:
        super().__init__()
        self.controller = controller
        self.policy = policy
        self.model_name = model_name
        self.max_model_len = max_model_len
        self._placement: dict[str, tuple[str, str]] = {}  # request id -> (prefill id, decode id)

    def _route(self, request: GenerateRequest) -> tuple[str, str]:
        c = self.controller
        try:
            return self.policy.choose(c.live_loads("prefill"), c.live_loads("decode"), request)
        except NoWorkerError as e:
            raise BackendUnavailableError(str(e)) from None

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        rid = request.request_id
        p, d = self._route(request)
        self._placement[rid] = (p, d)
        self._count(p, d, +1)
        finished = False
        try:
            await self.controller.ensure_channel(p, d)
            try:
                reserved = await self.controller.decode(d).reserve.remote(request, p)
            except RequestError as e:  # Ray re-raises the worker's error as a subclass of it
                raise BackendRejectedError(str(getattr(e, "cause", None) or e)) from None
            if not reserved:
                raise BackendOverloadedError(f"decode worker {d} has no free KV blocks")
            first = await self.controller.prefill(p).prefill.remote(request, d)
            if channel_failed(first.error):  # the pair's channel broke: the next request opens a new one
                self.controller.forget_channel(p, d)
            finished = first.finished
            if finished:  # done (or failed) at prefill: free the decode reservation now, not at its deadline
                self.controller.decode(d).abort.remote(rid)
            if first.queue_s is not None:
                self.report_timing(Phase.QUEUE, first.queue_s)
            yield first
            if finished:
                return
            stream = self.controller.decode(d).generate.options(num_returns="streaming").remote(rid, first)
            released = False
            async for ref in stream:
                delta: TokenDelta = await ref
                if not released:  # the decode side has every layer: prefill may drop its copy
                    self.controller.prefill(p).release.remote(rid)
                    released = True
                if delta.kv_transfer_s is not None:
                    self.report_timing(Phase.KV_TRANSFER, delta.kv_transfer_s)
                finished = delta.finished
                yield delta
                if finished:
                    return
        except ray.exceptions.RayActorError as e:
            dead = p if _names_actor(e, p) else d
            self.controller.mark_dead(dead)
            log.error("request %s lost its worker %s: %s", rid, dead, e)
            finished = True
            yield TokenDelta(rid, (), finish_reason=FinishReason.ERROR, error=f"worker {dead} died")
        finally:
            self._count(p, d, -1)
            self._placement.pop(rid, None)
            if not finished:
                await self._abort_on(rid, p, d)

    async def abort(self, request_id: str) -> None:
        placement = self._placement.get(request_id)
        if placement is not None:
            await self._abort_on(request_id, *placement)

    async def _abort_on(self, rid: str, p: str, d: str) -> None:
        calls = []
        for worker, handle in ((p, self.controller.prefill(p)), (d, self.controller.decode(d))):
            if worker not in self.controller.pools[worker.split("-")[0]].dead:
                calls.append(handle.abort.remote(rid))
                if worker == p:
                    calls.append(handle.release.remote(rid))
        await asyncio.gather(*calls, return_exceptions=True)

    def _count(self, p: str, d: str, step: int) -> None:
        """Count a placement in the cached load at once, so a burst spreads before reports refresh."""
        for wid in (p, d):
            report = self.controller.loads.get(wid)
            if report is not None:
                self.controller.loads[wid] = replace(report, waiting=max(0, report.waiting + step))

    def load(self) -> list[LoadReport]:
        return list(self.controller.loads.values())

    async def check_health(self) -> bool:
        c = self.controller
        return bool(c.live_loads("prefill")) and bool(c.live_loads("decode"))


def _names_actor(error: Exception, worker_id: str) -> bool:
    return f"diptych-{worker_id}" in str(error)
