"""The landing half of the KV connector (decode side): reserves blocks for a prompt whose KV is coming,
writes each layer's KV as it lands (on the channel's receiver thread, through the executor), and admits
the request to the decode batch once every layer of the prompt and its first token are in.

Reservations are made and resolved on the engine thread; receiver threads see only the reservation table
(under a lock) and the KV slots computed at reservation time, never the block manager.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch

from diptych.engine.core import EngineCore
from diptych.engine.executor import Executor
from diptych.engine.kv_transfer import (
    ChannelListener,
    FinishCode,
    FirstToken,
    KVChannel,
    KVStreamReceiver,
    StepHeader,
)
from diptych.engine.kv_transfer.torch_dist import set_nccl_error_handling
from diptych.engine.messages import (
    ChannelSpec,
    FailureKind,
    FinishReason,
    GenerateRequest,
    ReserveResult,
    TokenDelta,
    TransferSettings,
    request_tag,
)

log = logging.getLogger(__name__)
SLOW_WRITE_S = 0.5  # a KV message slower than this to write into the cache is logged

_FINISH_REASONS = {FinishCode.STOP: FinishReason.STOP, FinishCode.LENGTH: FinishReason.LENGTH}


@dataclass
class _Reservation:
    request: GenerateRequest
    sender_id: str
    seed: int
    slots: torch.Tensor  # [prompt_len] the prompt's KV cache slots, on the executor's device
    # Monotonic seconds. The lease runs to the request's own deadline until its KV starts to land, then
    # to the last landing + the transfer timeout (never past the deadline): a reservation expires when
    # its transfer stalls, not while its prompt waits for or runs through prefill.
    deadline: float
    lease: float
    reserved_at: float
    landed: list[int] = field(default_factory=list)  # per layer: prompt tokens whose KV has arrived
    landed_at: float | None = None  # epoch seconds when every layer of the whole prompt had landed
    first: FirstToken | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def all_landed(self) -> bool:
        return min(self.landed) >= self.prompt_len

    @property
    def ready(self) -> bool:
        return self.first is not None and (self.all_landed or self.first.finish is not FinishCode.NONE)


class KVLandingHalf:
    def __init__(
        self,
        core: EngineCore,
        executor: Executor,
        transfer: TransferSettings,
        submit: Callable[[Callable[[], None]], None],
        emit: Callable[[TokenDelta], None],
        on_landed: Callable[[str, str], None],
        on_channel_error: Callable[[str, KVStreamReceiver, Exception], None],
    ) -> None:
        """submit runs a function on the engine thread; the callbacks run there: emit hands a delta to its
        request's stream, on_landed(sender_id, request_id) tells the sender it may free its copy, and
        on_channel_error(sender_id, receiver, error) reports a failed channel."""
        self.core = core
        self.executor = executor
        self.transfer = transfer
        self._submit = submit
        self._emit = emit
        self._on_landed = on_landed
        self._on_channel_error = on_channel_error
        self.receivers: dict[str, KVStreamReceiver] = {}  # sender id -> its channel's receiver
        self._lock = threading.Lock()  # the reservation table, against the receiver threads
        self._reserved: dict[str, _Reservation] = {}
        self._by_tag: dict[int, str] = {}
        self.transfer_times: list[float] = []  # reservation to admission, seconds
        set_nccl_error_handling()

    @property
    def num_reserved(self) -> int:
        return len(self._reserved)

    # ---- engine thread ----

    def reserve(self, request: GenerateRequest, sender_id: str) -> ReserveResult:
        result = self.core.reserve(request)
        if not result.reserved:
            return result
        rid = request.request_id
        slots = self.core.prompt_slots(rid, len(request.prompt_token_ids))
        now = time.monotonic()
        left = request.seconds_left(time.time())
        # Without a deadline of its own (a direct caller, not the gateway) the transfer timeout bounds it.
        deadline = now + (self.transfer.timeout_s if left is None else left)
        seed = self.core.request_seed(request)
        r = _Reservation(request, sender_id, seed, slots, deadline, deadline, now)
        r.landed = [0] * self.executor.model_config.num_layers
        with self._lock:
            self._reserved[rid] = r
            self._by_tag[request_tag(rid)] = rid
        return result

    def cancel(self, request_id: str) -> bool:
        """Drop a reservation and free its blocks; False when there was none (running or unknown)."""
        with self._lock:
            r = self._reserved.pop(request_id, None)
            if r is None:
                return False
            del self._by_tag[request_tag(request_id)]
        self.core.free_blocks(request_id)
        return True

    def senders_of(self, sender_id: str) -> list[str]:
        return [rid for rid, r in self._reserved.items() if r.sender_id == sender_id]

    def expired(self) -> list[tuple[str, FailureKind, str]]:
        """Reservations whose lease ran out, with why (the caller fails them)."""
        now = time.monotonic()
        out = []
        for rid, r in list(self._reserved.items()):
            if r.lease >= now:
                continue
            if r.lease < r.deadline:
                why = f"KV transfer stalled: nothing arrived for {self.transfer.timeout_s:g} s"
                out.append((rid, FailureKind.TRANSFER_STALLED, why))
            else:
                landed = min(r.landed)
                why = f"the request's deadline passed with the KV of {landed} of {r.prompt_len} tokens in"
                out.append((rid, FailureKind.DEADLINE, why))
        return out

    def add_receiver(self, sender_id: str, receiver: KVStreamReceiver) -> None:
        old = self.receivers.pop(sender_id, None)
        if old is not None:
            old.stop()
        self.receivers[sender_id] = receiver
        receiver.start()  # here, so an error it reports is handled after it was registered

    def drop_channel(self, sender_id: str, receiver: KVStreamReceiver | None) -> list[str] | None:
        """Stop the channel from sender_id (`receiver`, or the current one); returns the reservations that
        waited on it (the caller fails them), or None when there was no such channel. A receiver that a
        newer channel already replaced is only stopped: its requests failed when the sender reported the
        channel broken, and the reservations from sender_id now wait on the new channel."""
        current = self.receivers.get(sender_id)
        receiver = current if receiver is None else receiver
        if receiver is None:
            return None
        receiver.stop()
        if receiver is not current:
            return []
        del self.receivers[sender_id]
        return self.senders_of(sender_id)

    def stop(self) -> None:
        for receiver in self.receivers.values():
            receiver.stop()

    def _activate_if_ready(self, request_id: str) -> None:
        with self._lock:
            r = self._reserved.get(request_id)
            if r is None or not r.ready:
                return
            del self._reserved[request_id]
            del self._by_tag[request_tag(request_id)]
        first = r.first
        assert first is not None
        finish = _FINISH_REASONS.get(first.finish)
        took = time.monotonic() - r.reserved_at
        delta = TokenDelta(
            request_id,
            (first.token_id,),
            logprobs=(first.logprob,) if first.logprob is not None and r.request.sampling.logprobs else None,
            finish_reason=finish,
            first_token_time=first.sampled_time,
            kv_transfer_s=took,
            kv_landed_time=r.landed_at,
            queue_s=first.queue_s,
        )
        if finish is not None:  # the prompt's first token ended it: nothing to decode
            self.core.free_blocks(request_id)
        else:
            self.transfer_times.append(took)
            self.core.admit_prefilled(r.request, r.seed, delta)
        self._emit(delta)
        self._on_landed(r.sender_id, request_id)

    # ---- channels (any thread) ----

    def listen(self, sender_id: str, name: str, host: str) -> ChannelSpec:
        """Open a channel for sender_id and return what the sender needs to join it; the channel finishes
        connecting on a thread of its own once the sender joins, then its receiver starts."""
        t = self.transfer
        listener = ChannelListener(t.backend, name, host, t.timeout_s, lanes=t.lanes)

        def connect() -> None:
            try:
                conn = listener.accept(self.executor.device)
            except Exception as e:  # the sender never joined: nothing was promised over it yet
                log.error("KV channel %s never connected: %s", name, e)
                return
            self._submit(partial(self.add_receiver, sender_id, self.make_receiver(sender_id, conn)))

        threading.Thread(target=connect, name=f"kv-connect-{name}", daemon=True).start()
        return listener.spec

    # ---- receiver threads ----

    def make_receiver(self, sender_id: str, channel: KVChannel) -> KVStreamReceiver:
        c = self.executor.model_config
        receiver = KVStreamReceiver(
            channel,
            c.num_layers,
            c.num_kv_heads,
            c.head_dim,
            self.executor.dtype,
            self.transfer.layers_per_message,
            on_layers=self._on_layers,
            on_step=self._on_step,
            on_error=lambda e: self._on_error(sender_id, receiver, e),
        )
        return receiver

    def _on_layers(self, header: StepHeader, layer_a: int, layer_b: int, payload: torch.Tensor) -> None:
        """payload [layers, 2, T, Hk, D]: write each known segment's rows into its reserved slots."""
        started = time.perf_counter()
        payload = payload.to(self.executor.device)  # a gloo channel stages on the CPU
        layers = range(layer_a, layer_b)
        with self._lock:
            for seg, rows in header.rows():
                rid = self._by_tag.get(seg.request_tag)
                if rid is not None:  # unknown tags (aborted here) are received and dropped
                    slots = self._reserved[rid].slots[
                        seg.start_position : seg.start_position + seg.num_tokens
                    ]
                    self.executor.write_kv(layers, payload[:, :, rows], slots)
        if (took := time.perf_counter() - started) > SLOW_WRITE_S:
            step, ms = header.step_id, took * 1e3
            log.warning("slow KV write: layers [%d, %d) of step %d took %.0f ms", layer_a, layer_b, step, ms)

    def _on_step(self, header: StepHeader) -> None:
        if header.segments and self.executor.device.type == "cuda":
            torch.cuda.current_stream(self.executor.device).synchronize()  # the KV writes are done
        touched = []
        renewed = time.monotonic() + self.transfer.timeout_s
        with self._lock:
            for seg in header.segments:
                rid = self._by_tag.get(seg.request_tag)
                if rid is not None:
                    r = self._reserved[rid]
                    r.lease = min(r.deadline, renewed)
                    end = seg.start_position + seg.num_tokens
                    for layer in range(header.layer_start, header.layer_end):
                        r.landed[layer] = max(r.landed[layer], end)
                    if r.landed_at is None and r.all_landed:
                        r.landed_at = time.time()
                    touched.append(rid)
            for token in header.first_tokens:
                rid = self._by_tag.get(token.request_tag)
                if rid is not None:
                    self._reserved[rid].first = token
                    touched.append(rid)
        for tag in header.aborted:
            rid = self._by_tag.get(tag)
            if rid is not None:
                self._submit(partial(self._aborted_by_sender, rid))
        for rid in touched:
            self._submit(partial(self._activate_if_ready, rid))

    def _aborted_by_sender(self, request_id: str) -> None:
        if self.cancel(request_id):
            self._emit(TokenDelta(request_id, (), finish_reason=FinishReason.ABORT))

    def _on_error(self, sender_id: str, receiver: KVStreamReceiver, error: Exception) -> None:
        log.error("KV channel %s -> here failed: %s", sender_id, error)
        self._submit(partial(self._on_channel_error, sender_id, receiver, error))
