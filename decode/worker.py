"""The decode worker: a Ray shell around an engine core and the KV connector's landing half.

It reserves KV blocks before prefill starts, lets each layer's KV land straight in them, starts decoding
as soon as every layer and the first token (which rides the KV stream) are in, tells the prefill worker it
may free its copy, and streams tokens until a stop condition, abort or failure. The engine runs in its
own thread, each KV channel's receiver in another; the methods here only hand them work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import torch

from diptych.engine.core import EngineCore
from diptych.engine.engine_thread import EngineThread, deliver, drain_until_finished
from diptych.engine.executor import LocalExecutor
from diptych.engine.kv_connector import KVLandingHalf, KVStreamReceiver
from diptych.engine.messages import (
    ChannelSpec,
    FailureKind,
    FinishReason,
    GenerateRequest,
    LoadReport,
    ReserveResult,
    TokenDelta,
    WorkerSpec,
    failed,
)

log = logging.getLogger(__name__)
OUTBOX_GRACE_S = 60.0  # a finished request's tokens wait this long for a stream that never attached

Stream = tuple[asyncio.AbstractEventLoop, "asyncio.Queue[TokenDelta]"]


class DecodeWorker:
    def __init__(self, spec: WorkerSpec) -> None:
        torch.set_num_threads(spec.torch_threads)
        self.spec = spec
        self.executor = LocalExecutor(spec.engine)
        self.core = EngineCore(spec.engine, self.executor)
        self.executor.prepare(spec.engine, self.core.max_model_len)
        self.thread = EngineThread(f"decode-{spec.worker_id}", self._step)
        self.kv = KVLandingHalf(
            self.core,
            self.executor,
            spec.transfer,
            submit=self.thread.submit,
            emit=self._emit,
            on_landed=self._tell_sender,
            on_channel_error=self._channel_failed,
        )
        self._senders: dict[str, Any] = {}  # prefill worker id -> its actor handle (for `release`)
        self._streams: dict[str, Stream] = {}  # engine thread: where each request's deltas go
        self._outboxes: dict[str, asyncio.Queue[TokenDelta]] = {}  # asyncio thread: not yet streamed
        self.thread.start()

    # ---- called by the controller / gateway (asyncio thread) ----

    async def open_receiver(self, prefill_id: str, prefill: Any = None) -> ChannelSpec:
        """Open a KV channel for prefill_id; returns what the prefill side needs to join it. The channel
        finishes connecting in the background once the prefill worker joins. `prefill` (its actor handle)
        is told when a request's KV has all landed."""
        if prefill is not None:
            self._senders[prefill_id] = prefill
        name = f"{prefill_id}->{self.spec.worker_id}-{time.monotonic_ns()}"
        return self.kv.listen(prefill_id, name, _node_ip())

    async def drop_channel(self, prefill_id: str) -> bool:
        """Close the KV channel from prefill_id as a failure would: a fault-injection and maintenance hook
        (e.g. to make a pair reconnect). Reservations waiting on it fail; the prefill side finds the
        channel broken on its next send, fails that step's requests, and the controller opens a new
        channel for the pair's next request. False when no channel from prefill_id was open."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()
        why = f"KV channel from {prefill_id} was dropped"
        self.thread.submit(lambda: deliver(loop, done.set_result, self._drop(prefill_id, None, why)))
        return await done

    async def reserve(self, request: GenerateRequest, prefill_id: str) -> ReserveResult:
        """Reserve blocks for the prompt and its first token, and an outbox for its tokens (`stream`)."""
        loop = asyncio.get_running_loop()
        if request.request_id in self._outboxes:
            return ReserveResult.duplicate(request.request_id)
        queue: asyncio.Queue[TokenDelta] = asyncio.Queue()
        done: asyncio.Future[ReserveResult] = loop.create_future()

        def reserve() -> None:
            result = self.kv.reserve(request, prefill_id)
            if result.reserved:
                self._streams[request.request_id] = (loop, queue)
            deliver(loop, done.set_result, result)

        self._outboxes[request.request_id] = queue
        self.thread.submit(reserve)
        result = await done
        if not result.reserved:
            del self._outboxes[request.request_id]
        return result

    async def stream(self, request_id: str) -> AsyncIterator[TokenDelta]:
        """The reserved request's tokens, from the first (sampled by prefill, carried by the KV stream) on;
        closing the stream early aborts the request."""
        queue = self._outboxes.pop(request_id, None)
        if queue is None:
            yield failed(request_id, FailureKind.INTERNAL, "no KV reservation for this request")
            return
        abandon = lambda: self.thread.submit(lambda: self._finish(request_id, FinishReason.ABORT))
        async for delta in drain_until_finished(queue, abandon):
            yield delta

    async def abort(self, request_id: str) -> None:
        self.thread.submit(lambda: self._finish(request_id, FinishReason.ABORT))

    async def load(self) -> LoadReport:
        load, recent = self.core.load(), self.kv.transfer_times[-64:]
        return LoadReport(
            self.spec.worker_id, "decode", load.running, self.kv.num_reserved, load.used_blocks,
            load.total_blocks, served=len(self.kv.transfer_times),
            kv_transfer_s_mean=sum(recent) / len(recent) if recent else 0.0,
        )  # fmt: skip

    async def healthy(self) -> bool:
        return self.thread.alive

    def shutdown(self) -> None:
        self.thread.stop()
        self.kv.stop()

    # ---- engine thread ----

    def _emit(self, delta: TokenDelta) -> None:
        stream = self._streams.get(delta.request_id)
        if stream is None:
            return
        if delta.finished:
            del self._streams[delta.request_id]
        loop, queue = stream
        deliver(loop, self._settle, queue, delta)

    def _settle(self, queue: asyncio.Queue[TokenDelta], delta: TokenDelta) -> None:
        """(asyncio thread) Queue a delta; the outbox of a request that finished without a stream is
        dropped after a grace period."""
        queue.put_nowait(delta)
        rid = delta.request_id
        if delta.finished and self._outboxes.get(rid) is queue:
            asyncio.get_running_loop().call_later(OUTBOX_GRACE_S, self._drop_outbox, rid, queue)

    def _drop_outbox(self, request_id: str, queue: asyncio.Queue[TokenDelta]) -> None:
        if self._outboxes.get(request_id) is queue:  # (a stream may have taken it meanwhile)
            del self._outboxes[request_id]

    def _tell_sender(self, prefill_id: str, request_id: str) -> None:
        sender = self._senders.get(prefill_id)
        if sender is not None:
            sender.release.remote(request_id)

    def _finish(
        self,
        request_id: str,
        reason: FinishReason,
        failure: FailureKind | None = None,
        error: str | None = None,
    ) -> None:
        """Abort or fail a request wherever it is (reserved or running) and free its blocks."""
        self.kv.cancel(request_id)
        self.core.abort_request(request_id, reason)
        if reason is FinishReason.ERROR:
            assert failure is not None and error is not None
            self._emit(failed(request_id, failure, error))
        else:
            self._emit(TokenDelta(request_id, (), finish_reason=reason))

    def _drop(self, prefill_id: str, receiver: KVStreamReceiver | None, reason: str) -> bool:
        waiting = self.kv.drop_channel(prefill_id, receiver)
        for rid in waiting or ():
            self._finish(rid, FinishReason.ERROR, FailureKind.KV_CHANNEL, reason)
        return waiting is not None

    def _channel_failed(self, prefill_id: str, receiver: KVStreamReceiver, error: Exception) -> None:
        self._drop(prefill_id, receiver, f"KV transfer from {prefill_id} failed: {error}")

    def _step(self) -> bool:
        for rid, failure, why in self.kv.expired():
            self._finish(rid, FinishReason.ERROR, failure, why)
        if not self.core.has_unfinished():
            return False
        for delta in self.core.step():
            self._emit(delta)
        return True


def _node_ip() -> str:
    """The address the prefill side reaches this worker's channel store at (this node's, inside Ray)."""
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
