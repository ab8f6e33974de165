"""The decode worker: reserves KV blocks before prefill starts, receives each layer's KV straight into
them, adds the sequence to its running batch once every layer has landed and the first token is known,
and streams tokens back until a stop condition, abort or failure. Wrapped as a Ray actor by the
controller; the engine runs in its own thread, each KV channel's receiver in another.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from functools import partial

import torch

from diptych.engine.engine_thread import EngineThread, deliver, drain_until_finished
from diptych.engine.kv_transfer import ChannelListener, ChannelSpec, KVStreamReceiver, StepHeader
from diptych.engine.llm_engine import LLMEngine
from diptych.engine.messages import (
    FinishReason,
    GenerateRequest,
    LoadReport,
    TokenDelta,
    WorkerSpec,
    request_tag,
)
from diptych.engine.model_runner import slots_for
from diptych.kernels import ops

log = logging.getLogger(__name__)
SLOW_WRITE_S = 0.5  # a KV message slower than this to write into the cache is logged

Stream = tuple[asyncio.AbstractEventLoop, "asyncio.Queue[TokenDelta]"]


@dataclass
class _Reservation:
    request: GenerateRequest
    prefill_id: str
    seed: int
    # Monotonic seconds. The lease runs to the request's own deadline until its KV starts to land, then
    # to the last landing + the transfer timeout (never past the deadline): a reservation expires when
    # its transfer stalls, not while its prompt waits for or runs through prefill.
    deadline: float
    lease: float
    reserved_at: float
    landed: int = 0  # prompt tokens whose KV has arrived for every layer
    landed_at: float | None = None  # epoch seconds when the whole prompt had landed
    first: TokenDelta | None = None
    stream: Stream | None = None

    @property
    def ready(self) -> bool:
        return self.first is not None and self.stream is not None and self.landed >= self.prompt_len

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_token_ids)


class DecodeWorker:
    def __init__(self, spec: WorkerSpec) -> None:
        torch.set_num_threads(spec.torch_threads)
        self.spec = spec
        self.engine = LLMEngine(spec.engine)
        self.receivers: dict[str, KVStreamReceiver] = {}
        # Guards the reservations and their blocks against the receiver threads writing KV into them.
        self._lock = threading.Lock()
        self._reserved: dict[str, _Reservation] = {}
        self._by_tag: dict[int, str] = {}
        self._streams: dict[str, Stream] = {}
        self.transfer_times: list[float] = []
        # (reservation to landing in s, landing time): reported on the request's first decode delta
        self._transfer_s: dict[str, tuple[float, float | None]] = {}
        self.thread = EngineThread(f"decode-{spec.worker_id}", self._step)
        self.thread.start()

    # ---- called by the controller / gateway (asyncio thread) ----

    async def open_receiver(self, prefill_id: str) -> ChannelSpec:
        """Open a KV channel for prefill_id; returns what the prefill side needs to join it. The channel
        finishes connecting in the background once the prefill worker joins."""
        c = self.engine.model_config
        name = f"{prefill_id}->{self.spec.worker_id}-{time.monotonic_ns()}"
        transfer = self.spec.transfer
        listener = ChannelListener(
            transfer.backend, name, _node_ip(), transfer.timeout_s, lanes=transfer.lanes
        )

        def start() -> None:
            try:
                conn = listener.accept(self.engine.device)
            except Exception as e:  # the prefill side never joined: nothing was promised over it yet
                log.error("KV channel %s never connected: %s", name, e)
                return
            receiver = KVStreamReceiver(
                conn,
                c.num_layers,
                c.num_kv_heads,
                c.head_dim,
                self.engine.config.torch_dtype,
                self.spec.transfer.layers_per_message,
                on_layers=self._on_layers,
                on_step=self._on_step,
                on_error=lambda e: self._on_channel_error(prefill_id, receiver, e),
            )
            self.thread.submit(partial(self._add_receiver, prefill_id, receiver))

        threading.Thread(target=start, name=f"kv-connect-{name}", daemon=True).start()
        return listener.spec

    async def drop_channel(self, prefill_id: str) -> bool:
        """Close the KV channel from prefill_id as a failure would: a fault-injection and maintenance hook
        (e.g. to make a pair reconnect). Reservations waiting on it fail; the prefill side finds the
        channel broken on its next send, fails that step's requests, and the controller opens a new
        channel for the pair's next request. False when no channel from prefill_id was open."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()
        drop = partial(self._drop_channel, prefill_id, None, f"KV channel from {prefill_id} was dropped")
        self.thread.submit(lambda: deliver(loop, done.set_result, drop()))
        return await done

    async def reserve(self, request: GenerateRequest, prefill_id: str) -> bool:
        """Reserve blocks for the prompt and its first token; False on back-pressure."""
        self.engine.check_request(request)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()
        self.thread.submit(lambda: deliver(loop, done.set_result, self._reserve(request, prefill_id)))
        return await done

    async def generate(self, request_id: str, first: TokenDelta) -> AsyncIterator[TokenDelta]:
        """Stream the request's tokens after the first (sampled by prefill) once its KV has landed."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenDelta] = asyncio.Queue()
        self.thread.submit(lambda: self._attach(request_id, first, (loop, queue)))
        abandon = lambda: self.thread.submit(lambda: self._finish(request_id, FinishReason.ABORT, None))
        async for delta in drain_until_finished(queue, abandon):
            yield delta

    async def abort(self, request_id: str) -> None:
        self.thread.submit(lambda: self._finish(request_id, FinishReason.ABORT, None))

    async def load(self) -> LoadReport:
        s, b = self.engine.scheduler, self.engine.blocks
        recent = self.transfer_times[-64:]
        return LoadReport(
            self.spec.worker_id,
            "decode",
            len(s.running),
            len(self._reserved),
            b.num_used_blocks,
            b.num_blocks,
            extra={
                "kv_transfer_s_mean": sum(recent) / len(recent) if recent else 0.0,
                "served": float(len(self.transfer_times)),
            },
        )

    async def healthy(self) -> bool:
        return self.thread.alive

    def shutdown(self) -> None:
        self.thread.stop()
        for receiver in self.receivers.values():
            receiver.stop()

    # ---- engine thread ----

    def _add_receiver(self, prefill_id: str, receiver: KVStreamReceiver) -> None:
        old = self.receivers.pop(prefill_id, None)
        if old is not None:
            old.stop()
        self.receivers[prefill_id] = receiver
        receiver.start()  # here, so an error it reports is handled after it was registered

    def _drop_channel(self, prefill_id: str, receiver: KVStreamReceiver | None, reason: str) -> bool:
        """Stop the channel from prefill_id (`receiver`, or the current one) and fail the reservations
        waiting on it. A receiver that a newer channel already replaced is only stopped: its requests
        failed when the prefill side reported the channel broken, and the reservations from prefill_id
        now wait on the new channel."""
        current = self.receivers.get(prefill_id)
        receiver = current if receiver is None else receiver
        if receiver is None:
            return False
        receiver.stop()
        if receiver is current:
            del self.receivers[prefill_id]
            for rid in [rid for rid, r in self._reserved.items() if r.prefill_id == prefill_id]:
                self._finish(rid, FinishReason.ERROR, reason)
        return True

    def _reserve(self, request: GenerateRequest, prefill_id: str) -> bool:
        rid = request.request_id
        with self._lock:
            if rid in self._reserved or not self.engine.blocks.reserve(
                rid, len(request.prompt_token_ids) + 1
            ):
                return False
            now = time.monotonic()
            left = request.seconds_left(time.time())
            # Without a deadline of its own (a direct caller, not the gateway) the transfer timeout bounds it.
            deadline = now + (self.spec.transfer.timeout_s if left is None else left)
            seed = self.engine.request_seed(request)
            self._reserved[rid] = _Reservation(request, prefill_id, seed, deadline, deadline, now)
            self._by_tag[request_tag(rid)] = rid
        return True

    def _attach(self, request_id: str, first: TokenDelta, stream: Stream) -> None:
        r = self._reserved.get(request_id)
        if r is None:
            deliver(stream[0], stream[1].put_nowait, _ended(request_id, "no KV reservation for this request"))
            return
        r.first, r.stream = first, stream
        self._activate_if_ready(request_id)

    def _activate_if_ready(self, request_id: str) -> None:
        with self._lock:
            r = self._reserved.get(request_id)
            if r is None or not r.ready:
                return
            del self._reserved[request_id]
            del self._by_tag[request_tag(request_id)]
        assert r.first is not None and r.stream is not None
        self.transfer_times.append(time.monotonic() - r.reserved_at)
        self._transfer_s[request_id] = (self.transfer_times[-1], r.landed_at)
        self._streams[request_id] = r.stream
        self.engine.admit_prefilled(r.request, r.seed, r.first)

    def _finish(self, request_id: str, reason: FinishReason, error: str | None) -> None:
        """Abort or fail a request wherever it is (reserved or running) and free its blocks."""
        with self._lock:
            r = self._reserved.pop(request_id, None)
            if r is not None:
                del self._by_tag[request_tag(request_id)]
                self.engine.blocks.free(request_id)
        stream = self._streams.pop(request_id, None) or (r.stream if r is not None else None)
        self._transfer_s.pop(request_id, None)
        if request_id in self.engine.sequences:
            self.engine.abort_request(request_id, reason)
        if stream is not None:
            delta = TokenDelta(request_id, (), finish_reason=reason, error=error)
            deliver(stream[0], stream[1].put_nowait, delta)

    def _expire_reservations(self) -> None:
        now = time.monotonic()
        for rid in [rid for rid, r in self._reserved.items() if r.lease < now]:
            r = self._reserved[rid]
            if r.lease < r.deadline:
                why = f"KV transfer stalled: nothing arrived for {self.spec.transfer.timeout_s:g} s"
            else:
                why = f"the request's deadline passed with the KV of {r.landed} of {r.prompt_len} tokens in"
            self._finish(rid, FinishReason.ERROR, why)

    def _step(self) -> bool:
        self._expire_reservations()
        if not self.engine.has_unfinished():
            return False
        for delta in self.engine.step():
            stream = self._streams.get(delta.request_id)
            if stream is None:
                continue
            if delta.finished:
                del self._streams[delta.request_id]
            transfer = self._transfer_s.pop(delta.request_id, None)
            if transfer is not None:
                delta = replace(delta, kv_transfer_s=transfer[0], kv_landed_time=transfer[1])
            deliver(stream[0], stream[1].put_nowait, delta)
        return True

    # ---- receiver threads ----

    def _on_layers(self, header: StepHeader, layer_a: int, layer_b: int, payload: torch.Tensor) -> None:
        """payload [layers, 2, T, Hk, D]: write each known segment's rows into its reserved blocks."""
        started = time.perf_counter()
        self._write_layers(header, layer_a, layer_b, payload)
        if (took := time.perf_counter() - started) > SLOW_WRITE_S:
            step, ms = header.step_id, took * 1e3
            log.warning("slow KV write: layers [%d, %d) of step %d took %.0f ms", layer_a, layer_b, step, ms)

    def _write_layers(self, header: StepHeader, layer_a: int, layer_b: int, payload: torch.Tensor) -> None:
        payload = payload.to(self.engine.device)  # a gloo channel stages on the CPU
        offset = 0
        bs = self.engine.blocks.block_size
        with self._lock:
            for seg in header.segments:
                rid = self._by_tag.get(seg.request_tag)
                if rid is not None:  # unknown tags (aborted here) are received and dropped
                    table = self.engine.blocks.block_table(rid)
                    slots = slots_for(table, seg.start_position, seg.num_tokens, bs)
                    slot_tensor = torch.tensor(slots, dtype=torch.int64, device=payload.device)
                    rows = slice(offset, offset + seg.num_tokens)
                    for i, layer in enumerate(range(layer_a, layer_b)):
                        ops.store_kv_cache(
                            payload[i, 0, rows],
                            payload[i, 1, rows],
                            self.engine.kv_cache.key(layer),
                            self.engine.kv_cache.value(layer),
                            slot_tensor,
                        )
                offset += seg.num_tokens

    def _on_step(self, header: StepHeader) -> None:
        if self.engine.device.type == "cuda":
            torch.cuda.current_stream(self.engine.device).synchronize()  # the KV writes are done
        landed = []
        renewed = time.monotonic() + self.spec.transfer.timeout_s
        with self._lock:
            for seg in header.segments:
                rid = self._by_tag.get(seg.request_tag)
                if rid is not None:
                    r = self._reserved[rid]
                    r.lease = min(r.deadline, renewed)
                    r.landed = max(r.landed, seg.start_position + seg.num_tokens)
                    if r.landed >= r.prompt_len and r.landed_at is None:
                        r.landed_at = time.time()
                    landed.append(rid)
        for tag in header.aborted:
            rid = self._by_tag.get(tag)
            if rid is not None:
                self.thread.submit(partial(self._finish, rid, FinishReason.ABORT, None))
        for rid in landed:
            self.thread.submit(partial(self._activate_if_ready, rid))

    def _on_channel_error(self, prefill_id: str, receiver: KVStreamReceiver, error: Exception) -> None:
        log.error("KV channel %s -> %s failed: %s", prefill_id, self.spec.worker_id, error)

        def drop() -> None:
            self._drop_channel(prefill_id, receiver, f"KV transfer from {prefill_id} failed: {error}")

        self.thread.submit(drop)


def _node_ip() -> str:
    """The address the prefill side reaches this worker's channel store at (this node's, inside Ray)."""
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


def _ended(request_id: str, message: str) -> TokenDelta:
    return TokenDelta(request_id, (), finish_reason=FinishReason.ERROR, error=message)
