"""The send half of the KV connector (prefill side): streams each step's KV, layer by layer, to the decode
worker of each request, then the first tokens the step sampled.

Runs on the engine thread. One `KVStreamSender` per destination channel; a channel that fails mid-step is
marked broken instead of failing the step, and its requests fail after the step (`take_broken`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from diptych.engine.forward_context import KVHook
from diptych.engine.kv_transfer import (
    FinishCode,
    FirstToken,
    KVStreamSender,
    Segment,
    TransferTimeout,
    open_channel,
)
from diptych.engine.kv_transfer.torch_dist import set_nccl_error_handling
from diptych.engine.messages import ChannelSpec, FinishReason, TokenDelta, TransferSettings, request_tag
from diptych.engine.model import LayerRange
from diptych.engine.scheduler import SchedulerOutput

log = logging.getLogger(__name__)

_FINISH_CODES = {
    None: FinishCode.NONE,
    FinishReason.STOP: FinishCode.STOP,
    FinishReason.LENGTH: FinishCode.LENGTH,
}


@dataclass(frozen=True)
class KVShape:
    """What a KV stream carries per layer and token (the model's), and the layers this side holds."""

    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    layers: LayerRange

    @property
    def band(self) -> tuple[int, int]:
        return self.layers.start, self.layers.end


def join_sender(
    channel: ChannelSpec, shape: KVShape, transfer: TransferSettings, device: torch.device
) -> KVStreamSender:
    """Join a channel that a decode worker opened (blocks until both sides are in): off the engine thread."""
    conn = open_channel(channel, 0, device)
    return KVStreamSender(
        conn,
        shape.num_layers,
        shape.kv_heads,
        shape.head_dim,
        shape.dtype,
        layers_per_message=transfer.layers_per_message,
        layers=shape.band,
    )


class KVSendHalf:
    def __init__(self, worker_id: str, device: torch.device, stream_layers: bool = True) -> None:
        self.worker_id = worker_id
        self.device = device
        self.stream_layers = stream_layers  # False: send a step's KV only after its forward (the baseline)
        self.senders: dict[str, KVStreamSender] = {}  # decode worker id -> its channel's sender
        self.destinations: dict[str, str] = {}  # request id -> decode worker id
        self._broken: set[str] = set()
        self._step_dests: list[str] = []
        self._deferred: list[tuple[str, int, torch.Tensor, torch.Tensor]] = []
        self.plan_s = 0.0  # time the last step spent beginning its KV steps (posting their headers)
        self.step_shape = (0, 0)  # the last step's sequences and tokens
        set_nccl_error_handling()

    # ---- channels and requests ----

    def add_channel(self, decode_id: str, sender: KVStreamSender) -> None:
        old = self.senders.pop(decode_id, None)
        if old is not None:
            old.close()
        self._broken.discard(decode_id)
        self.senders[decode_id] = sender

    def has_channel(self, decode_id: str) -> bool:
        return decode_id in self.senders

    def bind(self, request_id: str, decode_id: str) -> None:
        self.destinations[request_id] = decode_id

    def unbind(self, request_id: str, announce_abort: bool) -> None:
        """Forget a request; announce_abort tells its decode side to drop whatever of it is still coming."""
        decode_id = self.destinations.pop(request_id, None)
        if announce_abort and decode_id is not None and decode_id not in self._broken:
            sender = self.senders.get(decode_id)
            if sender is not None:
                sender.abort(request_tag(request_id))

    def close(self) -> None:
        for sender in self.senders.values():
            sender.close()

    # ---- one step ----

    def plan(self, out: SchedulerOutput) -> KVHook | None:
        """Begin one KV step per destination channel; return the hook that sends each layer."""
        started = time.perf_counter()
        self.step_shape = (len(out.chunks), out.num_tokens)
        try:
            return self._begin(out)
        finally:
            self.plan_s = time.perf_counter() - started

    def _begin(self, out: SchedulerOutput) -> KVHook | None:
        rows: dict[str, list[int]] = {}
        segments: dict[str, list[Segment]] = {}
        offset = 0
        for chunk in out.chunks:
            d = self.destinations.get(chunk.seq.request_id)
            if d is not None:
                rows.setdefault(d, []).extend(range(offset, offset + chunk.num_tokens))
                segments.setdefault(d, []).append(
                    Segment(request_tag(chunk.seq.request_id), chunk.start, chunk.num_tokens)
                )
            offset += chunk.num_tokens
        self._step_dests = [d for d in rows if d not in self._broken]
        for d in self._step_dests:
            self._guard(d, partial(KVStreamSender.begin_step, segments=segments[d]))
        index = {d: torch.tensor(rows[d], dtype=torch.int64, device=self.device) for d in self._step_dests}

        def send_layer(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            for d, idx in index.items():
                rows_k, rows_v = k.index_select(0, idx), v.index_select(0, idx)
                if self.stream_layers:
                    self._guard(d, partial(KVStreamSender.send_layer, layer=layer, k=rows_k, v=rows_v))
                else:  # baseline: hold every layer until the forward is done
                    self._deferred.append((d, layer, rows_k, rows_v))

        return send_layer if index else None

    def end_step(self, deltas: list[TokenDelta]) -> list[TokenDelta]:
        """Send what the forward deferred, close the step on every channel, then hand each decode side the
        first tokens of its requests; returns the deltas whose channel broke (their requests fail)."""
        for d, layer, k, v in self._deferred:
            self._guard(d, partial(KVStreamSender.send_layer, layer=layer, k=k, v=v))
        self._deferred.clear()
        for d in self._step_dests:
            self._guard(d, KVStreamSender.end_step)
        tokens: dict[str, list[FirstToken]] = {}
        lost = []
        for delta in deltas:
            dest = self.destinations.get(delta.request_id)
            if dest is None:
                continue
            if dest in self._broken:
                lost.append(delta)
                continue
            logprob = delta.logprobs[0] if delta.logprobs else None
            tokens.setdefault(dest, []).append(
                FirstToken(
                    request_tag(delta.request_id),
                    delta.token_ids[0],
                    logprob,
                    _FINISH_CODES[delta.finish_reason],
                    delta.first_token_time or time.time(),
                    delta.queue_s or 0.0,
                )
            )
        for d, batch in tokens.items():
            self._guard(d, partial(KVStreamSender.send_first_tokens, tokens=batch))
        return lost

    def take_broken(self) -> dict[str, list[str]]:
        """Channels that failed since the last call, each with the requests bound for it (now unbound); the
        channels are closed, so the controller opens new ones on next use."""
        broken = {}
        for d in self._broken:
            sender = self.senders.pop(d, None)
            if sender is not None:
                sender.close()
            broken[d] = [r for r, dest in self.destinations.items() if dest == d]
            for r in broken[d]:
                del self.destinations[r]
        self._broken.clear()
        return broken

    def _guard(self, decode_id: str, action: Callable[[KVStreamSender], None]) -> None:
        """Run a sender action; a failed channel is marked broken instead of failing the whole step."""
        if decode_id in self._broken:
            return
        try:
            action(self.senders[decode_id])
        except (TransferTimeout, RuntimeError) as e:
            log.error("KV channel %s -> %s failed: %s", self.worker_id, decode_id, e)
            self._broken.add(decode_id)
