"""The KV stream protocol over one channel: self-describing steps, so both sides post matching operations.

Every prefill step that carries KV for a channel is one fixed-size int64 header (the receiver can always
post it) followed by ceil(num_layers / layers_per_message) payload messages whose sizes both sides compute
from the header. The payload for layers [a, b) has shape [b - a, 2, T, kv_heads, head_dim]: per layer, K
rows then V rows of the step's T tokens, segments concatenated in header order. A step is always sent in
full (an abort rides in the next header), so the channel never desynchronises.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from enum import IntFlag

import torch

from diptych.engine.kv_transfer.base import Handle, KVChannel, TransferError

HEADER_WORDS = 1024  # 8 KiB of int64
_MAGIC = 0x4450_4B56  # "DPKV"
_VERSION = 1
_FIXED_WORDS = 11  # magic, version, step_id, flags, 5 layout words, num_segments, num_aborted
_TABLE_WORDS = HEADER_WORDS - _FIXED_WORDS  # 3 per segment, 1 per aborted tag
MAX_SEGMENTS = _TABLE_WORDS // 3

_DTYPE_CODES = {
    torch.float32: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.float8_e4m3fn: 4,
    torch.float8_e5m2: 5,
    torch.int8: 6,
    torch.uint8: 7,
}


class ProtocolError(TransferError):
    """The peer sent something this side cannot follow (corrupt header, different KV layout)."""


class StepFlags(IntFlag):
    NONE = 0
    CLOSE = 1  # the sender is closing the stream: no payload follows, the receiver stops


@dataclass(frozen=True)
class Segment:
    """A run of one request's tokens in a step: positions [start_position, start_position + num_tokens)."""

    request_tag: int
    start_position: int
    num_tokens: int

    def __post_init__(self) -> None:
        if self.start_position < 0 or self.num_tokens < 1:
            raise ValueError(f"bad segment {self}: need start_position >= 0 and num_tokens >= 1")


@dataclass(frozen=True)
class StepHeader:
    step_id: int
    segments: tuple[Segment, ...]
    aborted: tuple[int, ...] = ()  # request tags the sender aborted since the previous header
    flags: StepFlags = StepFlags.NONE

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.segments)

    @property
    def closing(self) -> bool:
        return StepFlags.CLOSE in self.flags

    def rows(self) -> Iterator[tuple[Segment, slice]]:
        """Each segment with its rows in the payload's token dimension."""
        offset = 0
        for segment in self.segments:
            yield segment, slice(offset, offset + segment.num_tokens)
            offset += segment.num_tokens


@dataclass(frozen=True)
class KVLayout:
    """What both sides of a channel must agree on; the header carries it so a mismatch is caught."""

    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    layers_per_message: int = 1

    def __post_init__(self) -> None:
        if min(self.num_layers, self.kv_heads, self.head_dim, self.layers_per_message) < 1:
            raise ValueError(f"bad KV layout {self}: sizes must be positive")
        if self.dtype not in _DTYPE_CODES:
            raise ValueError(f"KV dtype {self.dtype} is not supported by the KV stream")

    @property
    def groups(self) -> list[tuple[int, int]]:
        """The layer ranges [a, b) of the payload messages of a step, in order."""
        step = self.layers_per_message
        return [(a, min(a + step, self.num_layers)) for a in range(0, self.num_layers, step)]

    def group_of(self, layer: int) -> tuple[int, int]:
        a = layer - layer % self.layers_per_message
        return a, min(a + self.layers_per_message, self.num_layers)

    def payload_shape(self, num_layers: int, num_tokens: int) -> tuple[int, int, int, int, int]:
        return (num_layers, 2, num_tokens, self.kv_heads, self.head_dim)

    def words(self) -> list[int]:
        dims = [self.num_layers, self.kv_heads, self.head_dim, self.layers_per_message]
        return [*dims, _DTYPE_CODES[self.dtype]]


def encode_header(header: StepHeader, layout: KVLayout) -> torch.Tensor:
    table = [w for s in header.segments for w in (s.request_tag, s.start_position, s.num_tokens)]
    table += header.aborted
    if len(table) > _TABLE_WORDS:
        raise ValueError(
            f"step {header.step_id}: {len(header.segments)} segments and {len(header.aborted)} aborted tags "
            f"do not fit a header (3 words per segment + 1 per tag <= {_TABLE_WORDS})"
        )
    fixed = [_MAGIC, _VERSION, header.step_id, int(header.flags), *layout.words()]
    words = [*fixed, len(header.segments), len(header.aborted), *table]
    out = torch.zeros(HEADER_WORDS, dtype=torch.int64)
    out[: len(words)] = torch.tensor(words, dtype=torch.int64)
    return out


def decode_header(words: torch.Tensor, layout: KVLayout) -> StepHeader:
    w = words.tolist()
    if w[0] != _MAGIC or w[1] != _VERSION:
        raise ProtocolError(f"not a KV step header (magic {w[0]:#x}, version {w[1]})")
    if w[4:9] != layout.words():
        raise ProtocolError(
            "sender and receiver disagree on the KV layout: (layers, kv heads, head dim, layers per "
            f"message, dtype code) is {tuple(w[4:9])} there, {tuple(layout.words())} here"
        )
    num_segments, num_aborted = w[9], w[10]
    if 3 * num_segments + num_aborted > _TABLE_WORDS:
        raise ProtocolError(f"corrupt header: {num_segments} segments, {num_aborted} aborted tags")
    table = w[_FIXED_WORDS:]
    segments = tuple(Segment(*table[3 * i : 3 * i + 3]) for i in range(num_segments))
    aborted = tuple(table[3 * num_segments : 3 * num_segments + num_aborted])
    return StepHeader(w[2], segments, aborted, StepFlags(w[3]))


class _Staging:
    """A ring of reusable message buffers on the channel's device; each grows to the largest message."""

    def __init__(self, slots: int, dtype: torch.dtype, device: torch.device) -> None:
        self._buffers = [torch.empty(0, dtype=dtype, device=device) for _ in range(slots)]
        self._handles: list[Handle | None] = [None] * slots
        self._next = 0

    def take(self, shape: tuple[int, ...], timeout_s: float) -> tuple[int, torch.Tensor]:
        """The next slot, once its previous transfer is done, viewed as `shape` (contiguous)."""
        slot = self._next
        self._next = (slot + 1) % len(self._buffers)
        handle, self._handles[slot] = self._handles[slot], None
        if handle is not None:
            handle.stream_wait(timeout_s)
        numel = 1
        for n in shape:
            numel *= n
        buf = self._buffers[slot]
        if buf.numel() < numel:
            buf = self._buffers[slot] = torch.empty(numel, dtype=buf.dtype, device=buf.device)
        return slot, buf[:numel].view(shape)

    def posted(self, slot: int, handle: Handle) -> None:
        self._handles[slot] = handle

    def drain(self, timeout_s: float) -> None:
        for slot, handle in enumerate(self._handles):
            if handle is not None:
                handle.wait(timeout_s)
                self._handles[slot] = None

    def __len__(self) -> int:
        return len(self._buffers)


def _stream_scope(stream: torch.cuda.Stream | None) -> AbstractContextManager[object]:
    return torch.cuda.stream(stream) if stream is not None else nullcontext()


@dataclass
class _OpenStep:
    header: StepHeader
    next_layer: int = 0
    payload: torch.Tensor | None = None  # the message being filled
    slot: int = -1


class KVStreamSender:
    """Prefill side of a channel: streams each step's KV layer by layer. Owns the channel.

    On CUDA the copies into the staging buffers and the sends run on a side stream that first waits for
    the compute stream, so a layer's transfer overlaps the next layer's compute. `max_in_flight` staging
    buffers (default: two per lane of the channel) bound the messages posted and not yet complete.
    """

    def __init__(
        self,
        channel: KVChannel,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        layers_per_message: int = 1,
        *,
        max_in_flight: int | None = None,
    ) -> None:
        self.channel = channel
        self.layout = KVLayout(num_layers, kv_heads, head_dim, dtype, layers_per_message)
        self._timeout_s = channel.spec.timeout_s
        in_flight = 2 * channel.spec.lanes if max_in_flight is None else max_in_flight
        self._payloads = _Staging(in_flight, dtype, channel.device)
        self._headers = _Staging(2, torch.int64, torch.device("cpu"))
        cuda = channel.device.type == "cuda"
        self._stream = torch.cuda.Stream(channel.device) if cuda else None
        self._step: _OpenStep | None = None
        self._next_step_id = 0
        self._aborted: dict[int, None] = {}  # ordered set: announced in the next header

    def begin_step(self, segments: Sequence[Segment], aborted: Sequence[int] = ()) -> None:
        """Start a step: posts its header. `aborted` is the same as calling `abort` for each tag first."""
        if self._step is not None:
            raise RuntimeError(f"step {self._step.header.step_id} is still open: call end_step first")
        for tag in aborted:
            self.abort(tag)
        if any(s.request_tag in self._aborted for s in segments):
            raise ValueError("a step cannot carry a request that was aborted")
        header = StepHeader(self._next_step_id, tuple(segments), self._announce(len(segments)))
        self._post_header(header)
        self._next_step_id += 1
        self._step = _OpenStep(header)

    def send_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Queue layer `layer`'s K and V rows [T_step, kv_heads, head_dim] of this step's segments, in order.

        Layers come in order 0, 1, ...; a message goes out when its layer group is complete.
        """
        step = self._require_step()
        tokens = step.header.num_tokens
        expected = (tokens, self.layout.kv_heads, self.layout.head_dim)
        if tokens == 0:
            raise ValueError(f"step {step.header.step_id} carries no tokens, hence no layers")
        if layer != step.next_layer:
            raise ValueError(f"step {step.header.step_id}: expected layer {step.next_layer}, got {layer}")
        if tuple(k.shape) != expected or tuple(v.shape) != expected:
            got = (tuple(k.shape), tuple(v.shape))
            raise ValueError(f"layer {layer}: K and V must be {expected}, got {got[0]} and {got[1]}")
        a, b = self.layout.group_of(layer)
        if self._stream is not None:  # the side stream starts when the compute stream has written this layer
            self._stream.wait_stream(torch.cuda.current_stream(self.channel.device))
            for t in (k, v):
                if t.is_cuda:  # the allocator must not hand them back to the compute stream too early
                    t.record_stream(self._stream)
        with _stream_scope(self._stream):
            if layer == a:
                shape = self.layout.payload_shape(b - a, tokens)
                step.slot, step.payload = self._payloads.take(shape, self._timeout_s)
            assert step.payload is not None
            step.payload[layer - a, 0].copy_(k, non_blocking=True)
            step.payload[layer - a, 1].copy_(v, non_blocking=True)
            if layer == b - 1:
                self._payloads.posted(step.slot, self.channel.send(step.payload))
                step.payload = None
        step.next_layer += 1

    def end_step(self) -> None:
        """Close the step; all its messages are posted (not necessarily complete)."""
        step = self._require_step()
        if step.next_layer != self.layout.num_layers and step.header.num_tokens:
            raise RuntimeError(
                f"step {step.header.step_id} ended after {step.next_layer} of {self.layout.num_layers} layers"
            )
        self._step = None

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until everything posted has completed (raises TransferTimeout, TransferError)."""
        timeout = self._timeout_s if timeout_s is None else timeout_s
        self._headers.drain(timeout)
        self._payloads.drain(timeout)

    def abort(self, request_tag: int) -> None:
        """Announce `request_tag` as aborted in the next header; a step already begun is sent in full."""
        self._aborted[request_tag] = None

    def close(self, timeout_s: float | None = None) -> bool:
        """Tell the receiver the stream ends, wait for what is posted, close the channel (never raises).

        True when the receiver was told; False when the channel was broken or a step was left open (the
        receiver then sees the channel break).
        """
        told = False
        if not self.channel.broken and self._step is None:
            with contextlib.suppress(TransferError):
                self._post_header(StepHeader(self._next_step_id, (), (), StepFlags.CLOSE))
                self.flush(timeout_s)
                told = True
        self.channel.close()
        return told

    def _require_step(self) -> _OpenStep:
        if self._step is None:
            raise RuntimeError("no step is open: call begin_step first")
        return self._step

    def _announce(self, num_segments: int) -> tuple[int, ...]:
        """The aborted tags that fit in the next header beside its segments; the rest wait for the next."""
        if num_segments > MAX_SEGMENTS:
            raise ValueError(f"a step carries at most {MAX_SEGMENTS} segments, got {num_segments}")
        room = _TABLE_WORDS - 3 * num_segments
        tags = list(self._aborted)[:room]
        for tag in tags:
            del self._aborted[tag]
        return tuple(tags)

    def _post_header(self, header: StepHeader) -> None:
        slot, words = self._headers.take((HEADER_WORDS,), self._timeout_s)
        words.copy_(encode_header(header, self.layout))
        self._headers.posted(slot, self.channel.send(words))


class KVStreamReceiver:
    """Decode side of a channel: a daemon thread receives steps and hands each message to `on_layers`.

    Owns the channel. Callbacks run on the receiver thread (on CUDA with its receive stream current: work
    they enqueue is ordered after the payload; record an event in `on_step` to consume it elsewhere). The
    payload passed to `on_layers` is a staging view, valid only during the call. Bytes of a request the
    consumer no longer knows must still be received: `on_layers` simply drops them. `on_error` is called
    once when the channel breaks (timeout, peer death, protocol error, a callback raising); the thread ends
    then, and also when the sender closes the stream or `stop` is called (neither calls `on_error`).
    """

    def __init__(
        self,
        channel: KVChannel,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        layers_per_message: int,
        on_layers: Callable[[StepHeader, int, int, torch.Tensor], None],
        on_step: Callable[[StepHeader], None],
        on_error: Callable[[Exception], None],
        *,
        max_in_flight: int = 4,
    ) -> None:
        self.channel = channel
        self.layout = KVLayout(num_layers, kv_heads, head_dim, dtype, layers_per_message)
        self._on_layers = on_layers
        self._on_step = on_step
        self._on_error = on_error
        self._timeout_s = channel.spec.timeout_s
        self._payloads = _Staging(max_in_flight, dtype, channel.device)
        self._header = torch.zeros(HEADER_WORDS, dtype=torch.int64)
        cuda = channel.device.type == "cuda"
        self._stream = torch.cuda.Stream(channel.device) if cuda else None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"kv-recv[{channel.name}]", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop receiving and close the channel (a posted receive cannot be withdrawn otherwise)."""
        self._stopping.set()
        self.channel.close()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    def join(self, timeout_s: float | None = None) -> bool:
        """Wait for the receiver thread to end; True when it has."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        device_scope = torch.cuda.device(self.channel.device) if self._stream is not None else nullcontext()
        try:
            with device_scope, _stream_scope(self._stream):
                while (header := self._recv_header()) is not None:
                    self._recv_payloads(header)
                    self._on_step(header)
        except Exception as e:  # the channel is out of step now, whatever failed
            if not self._stopping.is_set():
                self._on_error(e)
        finally:
            self.channel.close()

    def _recv_header(self) -> StepHeader | None:
        """The next step's header (an idle wait: no deadline), or None when the sender closes the stream."""
        self.channel.recv(self._header).wait(None)
        header = decode_header(self._header, self.layout)
        return None if header.closing else header

    def _recv_payloads(self, header: StepHeader) -> None:
        if header.num_tokens == 0:
            return
        groups = deque(self.layout.groups)
        posted: deque[tuple[int, int, torch.Tensor, Handle]] = deque()

        def post() -> None:
            a, b = groups.popleft()
            shape = self.layout.payload_shape(b - a, header.num_tokens)
            _, payload = self._payloads.take(shape, self._timeout_s)
            posted.append((a, b, payload, self.channel.recv(payload)))

        # Keep a few receives posted ahead; a slot is reused only after `on_layers` returned from its
        # previous payload (on CUDA the receive is ordered after the work `on_layers` enqueued).
        for _ in range(min(len(self._payloads), len(groups))):
            post()
        while posted:
            a, b, payload, handle = posted.popleft()
            try:
                handle.wait(self._timeout_s)
            except TransferError as e:
                raise type(e)(f"{e} (step {header.step_id}, layers [{a}, {b}))") from e
            self._on_layers(header, a, b, payload)
            if groups:
                post()
