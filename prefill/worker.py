"""The prefill worker: runs prompts in chunks, streams each layer's KV to the request's decode worker
while the next layer computes, samples the first token, and holds its blocks until the decode side
confirms receipt. Wrapped as a Ray actor by the controller; the engine runs in its own thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from diptych.engine.engine_thread import EngineThread, deliver
from diptych.engine.forward_context import KVHook
from diptych.engine.kv_transfer import ChannelSpec, KVStreamSender, Segment, TransferTimeout, open_channel
from diptych.engine.llm_engine import LLMEngine, RequestError
from diptych.engine.messages import (
    FinishReason,
    GenerateRequest,
    LoadReport,
    TokenDelta,
    WorkerSpec,
    request_tag,
)
from diptych.engine.scheduler import SchedulerOutput

log = logging.getLogger(__name__)
# How a request's error says its KV channel is gone: the controller then opens a new one on next use.
CHANNEL_FAILURES = ("no KV channel from", "KV transfer to")
SLOW_STEP_S = 1.0  # a step slower than this is logged with where its time went


@dataclass
class _Pending:
    request: GenerateRequest
    decode_id: str
    loop: asyncio.AbstractEventLoop
    result: asyncio.Future[TokenDelta]


class PrefillWorker:
    def __init__(self, spec: WorkerSpec) -> None:
        torch.set_num_threads(spec.torch_threads)
        self.spec = spec
        self.engine = LLMEngine(spec.engine)
        self.senders: dict[str, KVStreamSender] = {}
        self.pending: dict[str, _Pending] = {}
        self.held: dict[str, float] = {}  # request id -> deadline for the decode side's receipt
        self._step_dests: list[str] = []
        self._broken: set[str] = set()
        self.served = 0  # requests whose first token this worker produced
        self._plan_s = 0.0  # time the last step spent beginning its KV steps (posting their headers)
        self._step_shape = (0, 0)  # the last step's sequences and tokens
        self._deferred: list[tuple[str, int, torch.Tensor, torch.Tensor]] = []
        self.stream_layers = spec.transfer.stream_layers
        self.thread = EngineThread(f"prefill-{spec.worker_id}", self._step)
        self.thread.start()

    # ---- called by the controller / gateway (asyncio thread) ----

    async def open_sender(self, decode_id: str, channel: ChannelSpec) -> None:
        """Join the KV channel that decode_id opened for this worker (blocks until both sides are in)."""
        conn = await asyncio.to_thread(open_channel, channel, 0, self.engine.device)
        c = self.engine.model_config
        sender = KVStreamSender(
            conn,
            c.num_layers,
            c.num_kv_heads,
            c.head_dim,
            self.engine.config.torch_dtype,
            layers_per_message=self.spec.transfer.layers_per_message,
        )
        self.thread.submit(lambda: self._add_sender(decode_id, sender))

    async def prefill(self, request: GenerateRequest, decode_id: str) -> TokenDelta:
        """Prefill the prompt, streaming its KV to decode_id; returns the first token."""
        loop = asyncio.get_running_loop()
        pending = _Pending(request, decode_id, loop, loop.create_future())
        self.thread.submit(lambda: self._admit(pending))
        return await pending.result

    async def abort(self, request_id: str) -> None:
        self.thread.submit(lambda: self._abort(request_id, FinishReason.ABORT, None))

    async def release(self, request_id: str) -> None:
        """The decode side has every layer: the KV held here is no longer needed."""
        self.thread.submit(lambda: self._release(request_id))

    async def load(self) -> LoadReport:
        s, b = self.engine.scheduler, self.engine.blocks
        return LoadReport(
            self.spec.worker_id,
            "prefill",
            len(s.running),
            len(s.waiting),
            b.num_used_blocks,
            b.num_blocks,
            extra={"held": float(len(self.held)), "served": float(self.served)},
        )

    async def set_stream_layers(self, stream: bool) -> None:
        """Switch between layer-wise streaming and sending after the forward (for benchmarks)."""
        self.thread.submit(lambda: setattr(self, "stream_layers", stream))

    async def healthy(self) -> bool:
        return self.thread.alive

    def shutdown(self) -> None:
        self.thread.stop()
        for sender in self.senders.values():
            sender.close()

    # ---- engine thread ----

    def _add_sender(self, decode_id: str, sender: KVStreamSender) -> None:
        old = self.senders.pop(decode_id, None)
        if old is not None:
            old.close()
        self._broken.discard(decode_id)
        self.senders[decode_id] = sender

    def _admit(self, p: _Pending) -> None:
        rid = p.request.request_id
        if p.decode_id not in self.senders:
            self._resolve(p, _error(rid, f"no KV channel from {self.spec.worker_id} to {p.decode_id}"))
            return
        left = p.request.seconds_left(time.time())
        if left is not None and left <= 0:  # its client has stopped waiting: spend no prefill on it
            self._resolve(p, _error(rid, "the request's deadline passed before its prefill began"))
            return
        try:
            self.engine.add_request(p.request)
        except RequestError as e:
            self._resolve(p, _error(rid, str(e)))
            return
        self.pending[rid] = p

    def _resolve(self, p: _Pending, delta: TokenDelta) -> None:
        def settle() -> None:
            if not p.result.done():  # the caller may have been cancelled meanwhile
                p.result.set_result(delta)

        deliver(p.loop, settle)

    def _abort(self, request_id: str, reason: FinishReason, error: str | None) -> None:
        self._release(request_id)
        p = self.pending.pop(request_id, None)
        if request_id in self.engine.sequences:
            self.engine.abort_request(request_id, reason)
        if p is None:
            return
        sender = self.senders.get(p.decode_id)
        if sender is not None and p.decode_id not in self._broken:
            sender.abort(request_tag(request_id))  # the decode side drops whatever of it is still coming
        self._resolve(p, TokenDelta(request_id, (), finish_reason=reason, error=error))

    def _release(self, request_id: str) -> None:
        if self.held.pop(request_id, None) is not None:
            self.engine.blocks.free(request_id)

    def _expire_held(self) -> None:
        now = time.monotonic()
        for rid in [r for r, deadline in self.held.items() if deadline < now]:
            log.warning("decode side never confirmed %s: freeing its prefill blocks", rid)
            self._release(rid)

    def _step(self) -> bool:
        self._expire_held()
        if not self.engine.has_unfinished():
            return False
        # The KV stream's staging buffers are written both while planning and inside the forward: one
        # inference-mode scope around the whole step keeps them all ordinary inference tensors.
        started = time.perf_counter()
        self._plan_s = 0.0
        with torch.inference_mode():
            deltas = self.engine.step(plan=self._plan_transfers)
            stepped = time.perf_counter()
            self._send_deferred()
            for sender_id in self._step_dests:
                self._guard(sender_id, KVStreamSender.end_step)
        if (took := time.perf_counter() - started) > SLOW_STEP_S:
            log.warning(
                "slow prefill step: %.0f ms (KV step headers %.0f, schedule + forward + sampling %.0f, "
                "deferred sends + end %.0f), %d sequences, %d tokens, %d first tokens",
                took * 1e3, self._plan_s * 1e3, (stepped - started - self._plan_s) * 1e3,
                (took - (stepped - started)) * 1e3, *self._step_shape, len(deltas),
            )  # fmt: skip
        for delta in deltas:
            p = self.pending.get(delta.request_id)
            if p is not None and p.decode_id in self._broken:
                continue  # its KV did not all get through: failed with the channel below
            self._first_token(delta)
        for decode_id in list(self._broken):
            self._fail_channel(decode_id)
        return True

    def _first_token(self, delta: TokenDelta) -> None:
        rid = delta.request_id
        p = self.pending.pop(rid, None)
        seq = self.engine.sequences.pop(rid, None)
        if seq is not None:  # not finished by its first token: hand over to decode, keep the KV
            self.engine.scheduler.finish(seq, FinishReason.STOP, free_blocks=False)
            self.held[rid] = time.monotonic() + self.spec.transfer.timeout_s
        if p is not None:
            self.served += 1
            self._resolve(p, delta)

    def _plan_transfers(self, out: SchedulerOutput) -> KVHook | None:
        """Begin one KV step per destination channel; return the hook that sends each layer."""
        started = time.perf_counter()
        self._step_shape = (len(out.chunks), out.num_tokens)
        try:
            return self._begin_transfers(out)
        finally:
            self._plan_s = time.perf_counter() - started

    def _begin_transfers(self, out: SchedulerOutput) -> KVHook | None:
        rows: dict[str, list[int]] = {}
        segments: dict[str, list[Segment]] = {}
        offset = 0
        for chunk in out.chunks:
            p = self.pending.get(chunk.seq.request_id)
            if p is not None:
                rows.setdefault(p.decode_id, []).extend(range(offset, offset + chunk.num_tokens))
                segments.setdefault(p.decode_id, []).append(
                    Segment(request_tag(chunk.seq.request_id), chunk.start, chunk.num_tokens)
                )
            offset += chunk.num_tokens
        self._step_dests = [d for d in rows if d not in self._broken]
        for d in self._step_dests:
            self._guard(d, partial(KVStreamSender.begin_step, segments=segments[d]))
        device = self.engine.device
        index = {d: torch.tensor(rows[d], dtype=torch.int64, device=device) for d in self._step_dests}

        def send_layer(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            for d, idx in index.items():
                rows_k, rows_v = k.index_select(0, idx), v.index_select(0, idx)
                if self.stream_layers:
                    self._guard(d, partial(KVStreamSender.send_layer, layer=layer, k=rows_k, v=rows_v))
                else:  # baseline: hold every layer until the forward is done
                    self._deferred.append((d, layer, rows_k, rows_v))

        return send_layer if index else None

    def _send_deferred(self) -> None:
        for d, layer, k, v in self._deferred:
            self._guard(d, partial(KVStreamSender.send_layer, layer=layer, k=k, v=v))
        self._deferred.clear()

    def _guard(self, decode_id: str, action: Callable[[KVStreamSender], None]) -> None:
        """Run a sender action; a failed channel is marked broken instead of failing the whole step."""
        if decode_id in self._broken:
            return
        try:
            action(self.senders[decode_id])
        except (TransferTimeout, RuntimeError) as e:
            log.error("KV channel %s -> %s failed: %s", self.spec.worker_id, decode_id, e)
            self._broken.add(decode_id)

    def _fail_channel(self, decode_id: str) -> None:
        """Fail every request bound for a broken channel; the controller opens a new one on next use."""
        sender = self.senders.pop(decode_id, None)
        if sender is not None:
            sender.close()
        for rid in [r for r, p in self.pending.items() if p.decode_id == decode_id]:
            self._abort(rid, FinishReason.ERROR, f"KV transfer to {decode_id} failed")
        self._broken.discard(decode_id)


def channel_failed(error: str | None) -> bool:
    """Whether a prefill error means the pair's KV channel is broken or missing."""
    return error is not None and error.startswith(CHANNEL_FAILURES)


def _error(request_id: str, message: str) -> TokenDelta:
    return TokenDelta(request_id, (), finish_reason=FinishReason.ERROR, error=message)
