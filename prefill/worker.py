"""The prefill worker: a Ray shell around an engine core and the KV connector's send half.

It runs prompts in chunks, streams each layer's KV to the request's decode worker while the next layer
computes, sends the first token on the same stream, and holds its blocks until the decode side says
everything has landed (`release`). The engine runs in its own thread; the methods here only hand it work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import torch

from diptych.engine.core import EngineCore, RequestError
from diptych.engine.engine_thread import EngineThread, deliver
from diptych.engine.executor import LocalExecutor
from diptych.engine.kv_connector import KVSendHalf, KVShape, join_sender
from diptych.engine.messages import (
    ChannelSpec,
    FailureKind,
    FinishReason,
    GenerateRequest,
    LoadReport,
    PrefillResult,
    WorkerSpec,
)

log = logging.getLogger(__name__)
SLOW_STEP_S = 1.0  # a step slower than this is logged with where its time went


@dataclass
class _Pending:
    request: GenerateRequest
    loop: asyncio.AbstractEventLoop
    result: asyncio.Future[PrefillResult]


class PrefillWorker:
    def __init__(self, spec: WorkerSpec) -> None:
        torch.set_num_threads(spec.torch_threads)
        self.spec = spec
        self.executor = LocalExecutor(spec.engine)
        self.core = EngineCore(spec.engine, self.executor)
        self.executor.prepare(spec.engine, self.core.max_model_len)
        c, executor = self.executor.model_config, self.executor
        self.kv_shape = KVShape(c.num_layers, c.num_kv_heads, c.head_dim, executor.dtype, executor.layers)
        self.kv = KVSendHalf(spec.worker_id, self.executor.device, spec.transfer.stream_layers)
        self.pending: dict[str, _Pending] = {}
        self.held: dict[str, float] = {}  # request id -> deadline for the decode side's word that all landed
        self.served = 0  # requests whose first token this worker produced
        self.thread = EngineThread(f"prefill-{spec.worker_id}", self._step)
        self.thread.start()

    # ---- called by the controller / gateway / decode workers (asyncio thread) ----

    async def open_sender(self, decode_id: str, channel: ChannelSpec) -> None:
        """Join the KV channel that decode_id opened for this worker (blocks until both sides are in)."""
        sender = await asyncio.to_thread(
            join_sender, channel, self.kv_shape, self.spec.transfer, self.executor.device
        )
        self.thread.submit(lambda: self.kv.add_channel(decode_id, sender))

    async def prefill(self, request: GenerateRequest, decode_id: str) -> PrefillResult:
        """Prefill the prompt, streaming its KV and then its first token to decode_id; returns once the first
        token is on its way (or why not)."""
        loop = asyncio.get_running_loop()
        pending = _Pending(request, loop, loop.create_future())
        self.thread.submit(lambda: self._admit(pending, decode_id))
        return await pending.result

    async def abort(self, request_id: str) -> None:
        self.thread.submit(lambda: self._abort(request_id, FinishReason.ABORT, None, None))

    async def release(self, request_id: str) -> None:
        """The decode side has every layer: the KV held here is no longer needed."""
        self.thread.submit(lambda: self._release(request_id))

    async def load(self) -> LoadReport:
        load = self.core.load()
        return LoadReport(
            self.spec.worker_id, "prefill", load.running, load.waiting, load.used_blocks, load.total_blocks,
            held=len(self.held), served=self.served,
        )  # fmt: skip

    async def set_stream_layers(self, stream: bool) -> None:
        """Switch between layer-wise streaming and sending after the forward (for benchmarks)."""
        self.thread.submit(lambda: setattr(self.kv, "stream_layers", stream))

    async def healthy(self) -> bool:
        return self.thread.alive

    def shutdown(self) -> None:
        self.thread.stop()
        self.kv.close()

    # ---- engine thread ----

    def _admit(self, p: _Pending, decode_id: str) -> None:
        rid = p.request.request_id
        if not self.kv.has_channel(decode_id):
            self._resolve(
                p, FailureKind.KV_CHANNEL, f"no KV channel from {self.spec.worker_id} to {decode_id}"
            )
            return
        left = p.request.seconds_left(time.time())
        if left is not None and left <= 0:  # its client has stopped waiting: spend no prefill on it
            self._resolve(p, FailureKind.DEADLINE, "the request's deadline passed before its prefill began")
            return
        try:
            self.core.add_request(p.request)
        except RequestError as e:
            self._resolve(p, FailureKind.REJECTED, str(e))
            return
        self.pending[rid] = p
        self.kv.bind(rid, decode_id)

    def _resolve(self, p: _Pending, failure: FailureKind | None = None, error: str | None = None) -> None:
        result = PrefillResult(p.request.request_id, error, failure)

        def settle() -> None:
            if not p.result.done():  # the caller may have been cancelled meanwhile
                p.result.set_result(result)

        deliver(p.loop, settle)

    def _abort(
        self, request_id: str, reason: FinishReason, failure: FailureKind | None, error: str | None
    ) -> None:
        self._release(request_id)
        self.core.abort_request(request_id, reason)
        self.kv.unbind(request_id, announce_abort=True)  # the decode side drops whatever of it is coming
        p = self.pending.pop(request_id, None)
        if p is not None:
            self._resolve(p, failure or FailureKind.INTERNAL, error or f"the request was {reason.value}ed")

    def _release(self, request_id: str) -> None:
        if self.held.pop(request_id, None) is not None:
            self.core.free_blocks(request_id)

    def _expire_held(self) -> None:
        now = time.monotonic()
        for rid in [r for r, deadline in self.held.items() if deadline < now]:
            log.warning("decode side never confirmed %s: freeing its prefill blocks", rid)
            self._release(rid)

    def _step(self) -> bool:
        self._expire_held()
        if not self.core.has_unfinished():
            return False
        # The KV stream's staging buffers are written both while planning and inside the forward: one
        # inference-mode scope around the whole step keeps them all ordinary inference tensors.
        started = time.perf_counter()
        with torch.inference_mode():
            deltas = self.core.step(plan=self.kv.plan)
            stepped = time.perf_counter()
            lost = {d.request_id for d in self.kv.end_step(deltas)}
        if (took := time.perf_counter() - started) > SLOW_STEP_S:
            log.warning(
                "slow prefill step: %.0f ms (KV step headers %.0f, schedule + forward + sampling %.0f, "
                "deferred sends + end %.0f), %d sequences, %d tokens, %d first tokens",
                took * 1e3, self.kv.plan_s * 1e3, (stepped - started - self.kv.plan_s) * 1e3,
                (took - (stepped - started)) * 1e3, *self.kv.step_shape, len(deltas),
            )  # fmt: skip
        for delta in deltas:
            if delta.request_id not in lost:  # its KV did not all get through: failed with the channel below
                self._first_token_sent(delta.request_id)
        for decode_id, request_ids in self.kv.take_broken().items():
            for rid in request_ids:
                self._abort(
                    rid, FinishReason.ERROR, FailureKind.KV_CHANNEL, f"KV transfer to {decode_id} failed"
                )
        return True

    def _first_token_sent(self, request_id: str) -> None:
        p = self.pending.pop(request_id, None)
        self.kv.unbind(request_id, announce_abort=False)
        if self.core.hand_over(request_id):  # not finished by its first token: keep the KV for decode
            self.held[request_id] = time.monotonic() + self.spec.transfer.timeout_s
        if p is not None:
            self.served += 1
            self._resolve(p)
