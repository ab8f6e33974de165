"""The KV transport interface: one channel per (prefill sender, decode receiver) pair, backends by registry.

A channel has its own two-rank communicator built on a TCPStore that the receiver hosts, so pairs come and
go without a global world. Transfers are asynchronous and posted in call order; both sides must post
matching operations in the same order (the stream protocol in `protocol.py` makes that order explicit).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import timedelta
from types import TracebackType

import torch
from torch.distributed import TCPStore

from diptych.engine.messages import ChannelSpec

SENDER_RANK = 0  # the prefill side
RECEIVER_RANK = 1  # the decode side; it hosts the pair's TCPStore


class TransferError(RuntimeError):
    """A transfer failed (peer gone, protocol violated): the channel is broken and must be replaced."""


class TransferTimeout(TransferError):
    """A transfer did not complete within its timeout: the channel is broken and must be replaced."""


class ChannelClosed(TransferError):
    """The channel was closed on this side while a transfer was pending or about to be posted."""


class Handle(ABC):
    """One posted send or recv."""

    @abstractmethod
    def wait(self, timeout_s: float | None) -> None:
        """Block the host until the transfer completed; `None` waits without a deadline.

        Raises TransferTimeout after `timeout_s`, TransferError when the channel broke, ChannelClosed when
        it was closed on this side; the channel is broken afterwards in every case.
        """

    def stream_wait(self, timeout_s: float) -> None:
        """Order the current device stream after the transfer; blocks the host where there is no stream."""
        self.wait(timeout_s)


class KVChannel(ABC):
    """A two-rank channel carrying tensors from the sender (rank 0) to the receiver (rank 1)."""

    def __init__(self, spec: ChannelSpec, rank: int, device: torch.device) -> None:
        assert rank in (SENDER_RANK, RECEIVER_RANK)
        self.spec = spec
        self.rank = rank
        self.device = device
        self._broken: str | None = None
        self._closed = False

    @classmethod
    @abstractmethod
    def connect(cls, spec: ChannelSpec, rank: int, device: torch.device, store: TCPStore) -> KVChannel:
        """Build the pair's communicator; blocks until the peer connects (spec.connect_timeout_s).

        `device` is where the worker's KV lives; the channel's own `device` is where it stages messages.
        """

    @abstractmethod
    def send(self, t: torch.Tensor) -> Handle:
        """Post an asynchronous send of a contiguous tensor; `t` must stay untouched until it completed."""

    @abstractmethod
    def recv(self, t: torch.Tensor) -> Handle:
        """Post an asynchronous receive into a preallocated contiguous tensor of the size that is sent."""

    @abstractmethod
    def _shutdown(self) -> None:
        """Release the communicator, breaking any transfer still pending on either side."""

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def peer(self) -> int:
        return 1 - self.rank

    @property
    def broken(self) -> bool:
        return self._broken is not None or self._closed

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Tear the channel down (idempotent); pending waits on both sides fail promptly."""
        if self._closed:
            return
        self._closed = True
        self._shutdown()

    def check_usable(self) -> None:
        if self._closed:
            raise ChannelClosed(f"channel {self.name!r} is closed")
        if self._broken is not None:
            raise TransferError(f"channel {self.name!r} is broken: {self._broken}")

    def failure(
        self, what: str, timeout_s: float | None, started: float, cause: BaseException
    ) -> TransferError:
        """Classify a failed wait, mark the channel broken and return the error to raise."""
        where = f"channel {self.name!r} (rank {self.rank})"
        elapsed = time.monotonic() - started
        error: TransferError
        if self._closed:
            error = ChannelClosed(f"{where}: closed while waiting for {what}")
        elif timeout_s is not None and elapsed >= 0.9 * timeout_s:  # the backend's clock may run a bit short
            error = TransferTimeout(f"{where}: {what} did not complete within {timeout_s:g} s")
        else:
            error = TransferError(f"{where}: {what} failed after {elapsed:.3f} s: {cause}")
        if self._broken is None:
            self._broken = str(error)
        return error

    def __enter__(self) -> KVChannel:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


TRANSPORTS: dict[str, type[KVChannel]] = {}


def register_transport(name: str) -> Callable[[type[KVChannel]], type[KVChannel]]:
    def register(cls: type[KVChannel]) -> type[KVChannel]:
        assert name not in TRANSPORTS, f"transport {name!r} registered twice"
        TRANSPORTS[name] = cls
        return cls

    return register


def open_channel(
    spec: ChannelSpec, rank: int, device: torch.device | str, store: TCPStore | None = None
) -> KVChannel:
    """Open one side of a channel; the receiver passes the store it hosts (see ChannelListener)."""
    try:
        transport = TRANSPORTS[spec.backend]
    except KeyError:
        known = ", ".join(sorted(TRANSPORTS))
        raise ValueError(
            f"channel {spec.name!r}: unknown KV transport {spec.backend!r}; known: {known}"
        ) from None
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if store is None:
        store = TCPStore(spec.host, spec.port, None, False, timedelta(seconds=spec.connect_timeout_s))
    return transport.connect(spec, rank, device, store)


class ChannelListener:
    """The receiver's half of setting a channel up: hosts the pair's TCPStore on a free port.

    Hand `spec` to the sender, then call `accept` while it calls `open_channel(spec, SENDER_RANK, device)`.
    """

    def __init__(
        self,
        backend: str,
        name: str,
        host: str = "127.0.0.1",
        timeout_s: float = 30.0,
        connect_timeout_s: float = 60.0,
        lanes: int = 1,
    ) -> None:
        self._store: TCPStore | None = TCPStore(
            host, 0, None, True, timedelta(seconds=connect_timeout_s), wait_for_workers=False
        )
        self.spec = ChannelSpec(backend, host, self._store.port, name, timeout_s, connect_timeout_s, lanes)

    def accept(self, device: torch.device | str) -> KVChannel:
        """Open the receiver side; blocks until the sender has connected. A listener accepts once."""
        if self._store is None:
            raise RuntimeError(f"channel {self.spec.name!r} was already accepted or closed")
        store, self._store = self._store, None
        return open_channel(self.spec, RECEIVER_RANK, device, store)

    def close(self) -> None:
        self._store = None


def listen_channel(
    backend: str, name: str, timeout_s: float, device: torch.device | str, host: str = "127.0.0.1"
) -> tuple[ChannelSpec, Callable[[], KVChannel]]:
    """The receiver's side in one call: the spec for the sender, and a blocking `accept` to run meanwhile."""
    listener = ChannelListener(backend, name, host, timeout_s)
    return listener.spec, lambda: listener.accept(device)
