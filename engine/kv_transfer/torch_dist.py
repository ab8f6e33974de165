"""KV channel backends on torch.distributed process groups built directly (no global world): gloo and NCCL."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from datetime import timedelta

import torch
from torch.distributed import PrefixStore, ProcessGroupGloo, TCPStore, Work

from diptych.engine.kv_transfer.base import (
    SENDER_RANK,
    ChannelClosed,
    ChannelSpec,
    Handle,
    KVChannel,
    register_transport,
)

# A wait without a deadline (the idle wait for the next step header) must never expire; deadlines of the
# waits that have one are enforced per wait.
_IDLE_TIMEOUT = timedelta(days=365)
_DATA_TAG = 0
_INTERRUPT_TAG = 1  # nothing is ever sent on it: a recv there that times out is how a gloo group is broken
_LOOPBACK = {"127.0.0.1", "localhost"}
_POLL_MIN_S = 10e-6  # NCCL completion polling: back off from 10 us to 0.1 ms, so a wait costs <= ~2x its
_POLL_MAX_S = 100e-6  # transfer's time on short messages and at most 0.1 ms of latency on long ones
_ERROR_HANDLING = "TORCH_NCCL_ASYNC_ERROR_HANDLING"


def _post(
    group: ProcessGroupGloo | torch.distributed.ProcessGroupNCCL,
    op: str,
    t: torch.Tensor,
    peer: int,
    tag: int,
) -> Work:
    post = group.send if op == "send" else group.recv  # type: ignore[union-attr]  # not in torch's stubs
    return post([t], peer, tag)


def _store_prefix(spec: ChannelSpec, group: str) -> str:
    return f"diptych-kv/{spec.name}/{group}"


def _gloo_timeout(timeout_s: float | None) -> timedelta:
    if timeout_s is None:
        # Explicit: gloo's "zero = the group's timeout" is the rendezvous bound (connect_timeout_s), which
        # set_timeout does not change for waits, so an idle channel would break after that long.
        return _IDLE_TIMEOUT
    return timedelta(milliseconds=max(1.0, timeout_s * 1e3))


def _gloo_group(spec: ChannelSpec, rank: int, store: TCPStore) -> ProcessGroupGloo:
    opts = ProcessGroupGloo._Options()  # type: ignore[attr-defined]  # the stubs only know the public one
    opts._timeout = timedelta(seconds=spec.connect_timeout_s)  # bounds the rendezvous only; see below
    # Both ends of a loopback channel are local: bind there rather than to whatever the hostname resolves to.
    loopback = spec.host in _LOOPBACK
    device = ProcessGroupGloo.create_device(hostname="127.0.0.1") if loopback else None
    opts._devices = [device or ProcessGroupGloo.create_default_device()]
    opts._threads = 1  # send/recv run on the transport's I/O thread; the worker pool only serves collectives
    group = ProcessGroupGloo(PrefixStore(_store_prefix(spec, "gloo"), store), rank, 2, opts)
    group.set_timeout(_IDLE_TIMEOUT)
    return group


class _GlooHandle(Handle):
    def __init__(self, channel: KVChannel, work: Work, what: str) -> None:
        self._channel = channel
        self._work: Work | None = work
        self._what = what

    def wait(self, timeout_s: float | None) -> None:
        if self._work is None:
            return
        started = time.monotonic()
        try:
            self._work.wait(_gloo_timeout(timeout_s))
        except RuntimeError as e:  # gloo breaks the whole group on a timeout or a lost peer
            raise self._channel.failure(self._what, timeout_s, started, e) from e
        self._work = None


@register_transport("gloo")
class GlooChannel(KVChannel):
    """Host tensors over gloo (TCP). Used on CPU, and for the step headers of NCCL channels."""

    def __init__(
        self, spec: ChannelSpec, rank: int, device: torch.device, group: ProcessGroupGloo, store: TCPStore
    ) -> None:
        super().__init__(spec, rank, device)
        self._group: ProcessGroupGloo | None = group
        self._store: TCPStore | None = store  # the receiver's copy hosts the rendezvous: keep it
        self._lock = threading.Lock()  # a post never races the interrupt that closes the group

    @classmethod
    def connect(cls, spec: ChannelSpec, rank: int, device: torch.device, store: TCPStore) -> GlooChannel:
        cpu = torch.device("cpu")  # gloo carries host tensors: a GPU worker's KV is staged through the host
        return cls(spec, rank, cpu, _gloo_group(spec, rank, store), store)

    def send(self, t: torch.Tensor) -> Handle:
        return self._post(t, "send")

    def recv(self, t: torch.Tensor) -> Handle:
        return self._post(t, "recv")

    def _post(self, t: torch.Tensor, op: str) -> Handle:
        assert t.device.type == "cpu" and t.is_contiguous(), f"{op} needs a contiguous host tensor"
        what = f"{op} of {t.nbytes} bytes"
        with self._lock:
            self.check_usable()
            assert self._group is not None
            started = time.monotonic()
            try:
                work = _post(self._group, op, t, self.peer, _DATA_TAG)
            except RuntimeError as e:  # the peer is gone already
                raise self.failure(what, None, started, e) from e
        return _GlooHandle(self, work, what)

    def _shutdown(self) -> None:
        with self._lock:
            group, self._group, self._store = self._group, None, None
        if group is None:
            return
        # A blocked gloo wait cannot be cancelled, but a timeout anywhere in the group closes all of its
        # connections: every pending wait here and at the peer then fails at once.
        with contextlib.suppress(RuntimeError):  # the expected timeout, or a group already broken
            _post(group, "recv", torch.empty(1), self.peer, _INTERRUPT_TAG).wait(timedelta(milliseconds=1))


class _NcclHandle(Handle):
    def __init__(self, channel: KVChannel, work: Work, what: str) -> None:
        self._channel = channel
        self._work: Work | None = work
        self._what = what

    def wait(self, timeout_s: float | None) -> None:
        if self._work is None:
            return
        started = time.monotonic()
        try:
            self._poll(self._work, timeout_s, started)
            self._work.wait()  # raises if the communicator failed
        except RuntimeError as e:
            raise self._channel.failure(self._what, timeout_s, started, e) from e
        self._work = None

    def _poll(self, work: Work, timeout_s: float | None, started: float) -> None:
        """NCCL cannot time out one operation without tearing the process down, so poll its completion."""
        pause = _POLL_MIN_S
        while not work.is_completed():
            late = timeout_s is not None and time.monotonic() - started >= timeout_s
            if late or self._channel.closed:
                raise RuntimeError("still pending")
            time.sleep(pause)
            pause = min(2 * pause, _POLL_MAX_S)

    def stream_wait(self, timeout_s: float) -> None:
        if self._work is not None:
            self._work.wait()  # without a timeout NCCL only makes the current stream wait


@register_transport("nccl")
class NcclChannel(KVChannel):
    """Device tensors over NCCL; host tensors (the step headers) over a gloo side group of the same pair.

    Headers on the side group mean no NCCL operation is pending while the channel is idle: NCCL cannot
    cancel one (only abort the whole communicator), and an idle wait would have to stay posted forever.
    With spec.lanes > 1 the pair has that many communicators and the i-th device message of each direction
    takes lane i % lanes on both sides, so the order within every lane still matches.
    """

    def __init__(self, spec: ChannelSpec, rank: int, device: torch.device, control: GlooChannel) -> None:
        super().__init__(spec, rank, device)
        self._control = control
        self._lanes: list[torch.distributed.ProcessGroupNCCL] = []
        self._posted = {"send": 0, "recv": 0}  # device messages posted so far, per direction

    @classmethod
    def connect(cls, spec: ChannelSpec, rank: int, device: torch.device, store: TCPStore) -> NcclChannel:
        if device.type != "cuda":
            raise ValueError(f"channel {spec.name!r}: NCCL carries CUDA tensors, the worker is on {device}")
        channel = cls(spec, rank, device, GlooChannel.connect(spec, rank, torch.device("cpu"), store))
        try:
            channel._lanes = [_nccl_group(spec, rank, store, lane) for lane in range(spec.lanes)]
            channel._warm_up()
        except BaseException:
            channel.close()
            raise
        return channel

    @property
    def broken(self) -> bool:
        return super().broken or self._control.broken

    def check_usable(self) -> None:
        super().check_usable()
        self._control.check_usable()

    def send(self, t: torch.Tensor) -> Handle:
        return self._control.send(t) if t.device.type == "cpu" else self._post(t, "send")

    def recv(self, t: torch.Tensor) -> Handle:
        return self._control.recv(t) if t.device.type == "cpu" else self._post(t, "recv")

    def _post(self, t: torch.Tensor, op: str) -> Handle:
        assert t.device == self.device and t.is_contiguous(), f"{op} needs a contiguous {self.device} tensor"
        self.check_usable()
        lanes = self._lanes
        if not lanes:
            raise ChannelClosed(f"channel {self.name!r} is closed")
        group = lanes[self._posted[op] % len(lanes)]
        self._posted[op] += 1
        what = f"{op} of {t.nbytes} bytes"
        started = time.monotonic()
        try:
            with torch.cuda.device(self.device):
                work = _post(group, op, t, self.peer, _DATA_TAG)
        except RuntimeError as e:  # an aborted communicator
            raise self.failure(what, None, started, e) from e
        return _NcclHandle(self, work, what)

    def _warm_up(self) -> None:
        """One tiny transfer per lane creates the NCCL communicators now, not within the first step's
        timeout. Then every lane count starts from zero again, on both sides."""
        probe = torch.zeros(1, device=self.device)
        op = "send" if self.rank == SENDER_RANK else "recv"
        for _ in self._lanes:
            self._post(probe, op).wait(self.spec.connect_timeout_s)
        self._posted[op] = 0

    def _shutdown(self) -> None:
        self._control.close()
        lanes, self._lanes = self._lanes, []
        for group in lanes:
            group.abort()  # also stops NCCL kernels still waiting for a peer that is gone


def _nccl_group(
    spec: ChannelSpec, rank: int, store: TCPStore, lane: int
) -> torch.distributed.ProcessGroupNCCL:
    opts = torch.distributed.ProcessGroupNCCL.Options()
    opts._timeout = _IDLE_TIMEOUT  # deadlines are ours (polling): the watchdog must never fire first
    prefixed = PrefixStore(_store_prefix(spec, f"nccl-{lane}"), store)
    set_nccl_error_handling()
    return torch.distributed.ProcessGroupNCCL(prefixed, rank, 2, opts)


def set_nccl_error_handling() -> None:
    """Once per process, before its first NCCL group: a lost peer must break the channel, not the process.
    torch's default handling of an asynchronous NCCL error tears the whole process down; a group reads the
    setting when it is built, so it is set once (2 = CleanUpOnly: abort the group's communicators) and
    never changed while channels open on parallel threads. An explicit setting in the environment wins."""
    os.environ.setdefault(_ERROR_HANDLING, "2")
