"""The KV stream protocol over one channel: self-describing steps, so both sides post matching operations.

Every prefill step that carries KV for a channel is one fixed-size int64 header (the receiver can always
post it) followed by one payload message per group of layers_per_message layers of the sender's layer band
[layer_start, layer_end) (a pipeline stage sends only its own layers, so several senders can fill one
request), whose sizes both sides compute from the header. The payload for layers [a, b) has shape
[b - a, 2, T, kv_heads, head_dim]: per layer, K rows then V rows of the step's T tokens, segments
concatenated in header order. A step is always sent in full (an abort rides in the next header), so the
channel never desynchronises. A header without segments carries no payload: the sender posts one after a
step to hand over the first tokens it sampled, so the decode side starts without anyone relaying them.
"""

from __future__ import annotations

import contextlib
import math
import struct
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
_VERSION = 2
# magic, version, step_id, flags, 5 layout words, layer_start, layer_end, num_segments, num_aborted,
# num_first_tokens
_FIXED_WORDS = 14
_TABLE_WORDS = HEADER_WORDS - _FIXED_WORDS  # 3 per segment, 1 per aborted tag, 6 per first token
_FIRST_TOKEN_WORDS = 6
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


class FinishCode(IntFlag):
    """How a first token ended its request, if it did (FinishReason STOP / LENGTH on the wire)."""

    NONE = 0
    STOP = 1
    LENGTH = 2


@dataclass(frozen=True)
class FirstToken:
    """The token a prefill sampled after a request's last prompt chunk, with what decode reports with it."""

    request_tag: int
    token_id: int
    logprob: float | None = None
    finish: FinishCode = FinishCode.NONE
    sampled_time: float = 0.0  # epoch seconds
    queue_s: float = 0.0  # arrival at the prefill worker to its first scheduled step


@dataclass(frozen=True)
class StepHeader:
    step_id: int
    segments: tuple[Segment, ...]
    aborted: tuple[int, ...] = ()  # request tags the sender aborted since the previous header
    flags: StepFlags = StepFlags.NONE
    layer_start: int = 0  # the sender's layer band: the payloads cover [layer_start, layer_end)
    layer_end: int = 0
    first_tokens: tuple[FirstToken, ...] = ()

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

    def groups(self, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
        """The layer ranges [a, b) of the payload messages of a step of band [start, end), in order."""
        end = self.num_layers if end is None else end
        step = self.layers_per_message
        return [(a, min(a + step, end)) for a in range(start, end, step)]

    def group_of(self, layer: int, start: int = 0, end: int | None = None) -> tuple[int, int]:
        end = self.num_layers if end is None else end
        a = layer - (layer - start) % self.layers_per_message
        return a, min(a + self.layers_per_message, end)

    def check_band(self, start: int, end: int) -> None:
        if not 0 <= start < end <= self.num_layers:
            raise ValueError(f"layer band [{start}, {end}) is not inside [0, {self.num_layers})")

    def payload_shape(self, num_layers: int, num_tokens: int) -> tuple[int, int, int, int, int]:
        return (num_layers, 2, num_tokens, self.kv_heads, self.head_dim)

    def words(self) -> list[int]:
        dims = [self.num_layers, self.kv_heads, self.head_dim, self.layers_per_message]
        return [*dims, _DTYPE_CODES[self.dtype]]


def _float_word(x: float) -> int:
    return int.from_bytes(struct.pack("<d", x), "little", signed=True)


def _word_float(w: int) -> float:
    return float(struct.unpack("<d", w.to_bytes(8, "little", signed=True))[0])


def _token_words(t: FirstToken) -> list[int]:
    logprob = math.nan if t.logprob is None else t.logprob
    return [
        t.request_tag, t.token_id, _float_word(logprob), int(t.finish), _float_word(t.sampled_time),
        _float_word(t.queue_s),
    ]  # fmt: skip


def _words_token(w: list[int]) -> FirstToken:
    logprob = _word_float(w[2])
    return FirstToken(
        w[0],
        w[1],
        None if math.isnan(logprob) else logprob,
        FinishCode(w[3]),
        _word_float(w[4]),
        _word_float(w[5]),
    )


def encode_header(header: StepHeader, layout: KVLayout) -> torch.Tensor:
    table = [w for s in header.segments for w in (s.request_tag, s.start_position, s.num_tokens)]
    table += header.aborted
    table += [w for t in header.first_tokens for w in _token_words(t)]
    if len(table) > _TABLE_WORDS:
        raise ValueError(
            f"step {header.step_id}: {len(header.segments)} segments, {len(header.aborted)} aborted tags and "
            f"{len(header.first_tokens)} first tokens do not fit a header (3 words per segment + 1 per tag + "
            f"{_FIRST_TOKEN_WORDS} per first token <= {_TABLE_WORDS})"
        )
    fixed = [_MAGIC, _VERSION, header.step_id, int(header.flags), *layout.words()]
    counts = [len(header.segments), len(header.aborted), len(header.first_tokens)]
    words = [*fixed, header.layer_start, header.layer_end, *counts, *table]
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
    layer_start, layer_end, num_segments, num_aborted, num_first = w[9:14]
    if 3 * num_segments + num_aborted + _FIRST_TOKEN_WORDS * num_first > _TABLE_WORDS or min(w[9:14]) < 0:
        raise ProtocolError(
            f"corrupt header: {num_segments} segments, {num_aborted} aborted tags, {num_first} first tokens"
        )
    if num_segments and not 0 <= layer_start < layer_end <= layout.num_layers:
        raise ProtocolError(f"corrupt header: layer band [{layer_start}, {layer_end}) of {layout.num_layers}")
    table = w[_FIXED_WORDS:]
    segments = tuple(Segment(*table[3 * i : 3 * i + 3]) for i in range(num_segments))
    at = 3 * num_segments
    aborted = tuple(table[at : at + num_aborted])
    at += num_aborted
    first = tuple(
        _words_token(table[at + _FIRST_TOKEN_WORDS * i : at + _FIRST_TOKEN_WORDS * (i + 1)])
        for i in range(num_first)
    )
    return StepHeader(w[2], segments, aborted, StepFlags(w[3]), layer_start, layer_end, first)


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
        layers: tuple[int, int] | None = None,
    ) -> None:
        """layers: the band [start, end) this sender streams (default: every layer)."""
        self.channel = channel
        self.layout = KVLayout(num_layers, kv_heads, head_dim, dtype, layers_per_message)
        self.band = layers if layers is not None else (0, num_layers)
        self.layout.check_band(*self.band)
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
        start, end = self.band
        header = StepHeader(
            self._next_step_id, tuple(segments), self._announce(3 * len(segments)), StepFlags.NONE, start, end
        )
        self._post_header(header)
        self._next_step_id += 1
        self._step = _OpenStep(header, next_layer=start)

    def send_first_tokens(self, tokens: Sequence[FirstToken]) -> None:
        """Hand the receiver the first tokens of requests whose prompts this channel carried (a header
        without payload, after the steps that carried their KV)."""
        if self._step is not None:
            raise RuntimeError(f"step {self._step.header.step_id} is still open: call end_step first")
        tokens = list(tokens)
        while tokens:  # a header holds a bounded number of them
            room = (_TABLE_WORDS - len(self._aborted)) // _FIRST_TOKEN_WORDS or 1
            batch, tokens = tokens[:room], tokens[room:]
            aborted = self._announce(_FIRST_TOKEN_WORDS * len(batch))
            start, end = self.band
            self._post_header(
                StepHeader(self._next_step_id, (), aborted, StepFlags.NONE, start, end, tuple(batch))
            )
            self._next_step_id += 1

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
        a, b = self.layout.group_of(layer, *self.band)
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
        if step.next_layer != self.band[1] and step.header.num_tokens:
            raise RuntimeError(
                f"step {step.header.step_id} ended after {step.next_layer - self.band[0]} of "
                f"{self.band[1] - self.band[0]} layers (band {list(self.band)})"
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

    def _announce(self, used_words: int) -> tuple[int, ...]:
        """The aborted tags that fit in the next header beside its other `used_words` table words; the rest
        wait for the next header."""
        if used_words > _TABLE_WORDS:
            raise ValueError(f"a step carries at most {MAX_SEGMENTS} segments, got {used_words // 3}")
        room = _TABLE_WORDS - used_words
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
        groups = deque(self.layout.groups(header.layer_start, header.layer_end))
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
