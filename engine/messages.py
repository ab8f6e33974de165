"""Typed messages that cross a boundary: gateway <-> controller <-> workers, prefill <-> decode, engine <->
caller.

Every Ray actor call carries one of these dataclasses (or enums); nothing else crosses a process boundary.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from enum import Enum
from typing import Literal

from diptych.engine.engine_config import EngineConfig

Role = Literal["prefill", "decode", "colocated"]


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range or of the wrong type."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> SamplingParamsError:
            return SamplingParamsError(f"{name} must be {rule}, got {getattr(self, name)!r}")

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise bad("max_tokens", "an integer >= 1")
        if not _is_number(self.temperature) or not 0.0 <= self.temperature <= 100.0:
            raise bad("temperature", "a number in [0, 100]")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "a number in (0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "an integer >= 0 (0 disables it)")
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "a number in [0, 1]")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise bad("seed", "an integer")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "a list of non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def request_tag(request_id: str) -> int:
    """A request's id as a signed int64, for headers on the KV channel (same value in every process)."""
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


class FinishReason(str, Enum):
    STOP = "stop"  # eos, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"  # the client went away or the caller aborted
    ERROR = "error"  # a worker failed or a transfer timed out


class FailureKind(str, Enum):
    """Why a request failed, on the delta that says so (finish_reason ERROR): callers branch on this."""

    KV_CHANNEL = "kv_channel"  # the pair's KV channel is missing or broke: the next request opens a new one
    TRANSFER_STALLED = "transfer_stalled"  # a KV transfer that started stopped arriving
    DEADLINE = "deadline"  # the request's own deadline passed
    REJECTED = "rejected"  # the worker cannot serve it as asked (too long, bad tokens, duplicate id)
    WORKER_DIED = "worker_died"  # a worker of the request died
    INTERNAL = "internal"  # anything else (a bug)


@dataclass(frozen=True)
class GenerateRequest:
    """One request as the workers see it: already tokenized."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    arrival_time: float = 0.0
    deadline_time: float | None = None  # epoch seconds the client stops waiting (the gateway's timeout)

    def seconds_left(self, now: float) -> float | None:
        """Until deadline_time from `now` (epoch seconds); None when the request has no deadline."""
        return None if self.deadline_time is None else self.deadline_time - now


@dataclass(frozen=True)
class TokenDelta:
    """New tokens of one request, streamed from the worker that produced them."""

    request_id: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] | None = None
    finish_reason: FinishReason | None = None
    error: str | None = None
    failure: FailureKind | None = None  # set with `error`
    # Timing, filled where known: when the first token was sampled (epoch seconds), and how long the
    # request's KV took from reservation to landing on the decode worker (on its first decode delta).
    first_token_time: float | None = None
    kv_transfer_s: float | None = None
    kv_landed_time: float | None = None  # epoch seconds the last layer of the prompt's KV landed
    queue_s: float | None = None  # arrival at the worker to its first scheduled step (first delta only)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def failed(request_id: str, failure: FailureKind, message: str) -> TokenDelta:
    """The delta that ends a request with an error."""
    return TokenDelta(request_id, (), finish_reason=FinishReason.ERROR, error=message, failure=failure)


class ReserveOutcome(str, Enum):
    RESERVED = "reserved"
    NO_FREE_BLOCKS = "no_free_blocks"  # back-pressure: try later or elsewhere (HTTP 429)
    DUPLICATE_ID = "duplicate_id"  # a request with this id is already reserved or running here
    REJECTED = "rejected"  # the request can never be served here as asked (HTTP 400)


@dataclass(frozen=True)
class ReserveResult:
    """The decode side's answer to a reservation: whether it holds blocks for the request, and why not."""

    outcome: ReserveOutcome
    message: str = ""

    @property
    def reserved(self) -> bool:
        return self.outcome is ReserveOutcome.RESERVED

    @classmethod
    def duplicate(cls, request_id: str) -> ReserveResult:
        return cls(ReserveOutcome.DUPLICATE_ID, duplicate_id_message(request_id))


def duplicate_id_message(request_id: str) -> str:
    return f"request id {request_id!r} is already in use"


@dataclass(frozen=True)
class PrefillResult:
    """The prefill side's answer: the prompt's KV and first token went out on the KV stream, or why not."""

    request_id: str
    error: str | None = None
    failure: FailureKind | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class LoadReport:
    """What a worker tells the controller (and the router) about itself."""

    worker_id: str
    role: Role
    running: int
    waiting: int  # prefill: queued prompts; decode: reservations whose KV has not all landed
    used_blocks: int
    total_blocks: int
    held: int = 0  # prefill: requests whose KV it holds until the decode side has it all
    served: int = 0  # prefill: first tokens produced; decode: requests admitted after their KV landed
    kv_transfer_s_mean: float = 0.0  # decode: reservation to landing, over recent requests


@dataclass(frozen=True)
class ChannelSpec:
    """What the controller hands both sides of a KV channel (picklable)."""

    backend: str  # a key of kv_transfer.TRANSPORTS: "gloo" (CPU) or "nccl" (GPU)
    host: str  # where the receiver's TCPStore listens
    port: int
    name: str  # unique per pair, e.g. "prefill-0->decode-1"
    timeout_s: float = 30.0  # bounds each wait for a message of a step that started (never an idle wait)
    connect_timeout_s: float = 60.0  # bounds the rendezvous, which includes waiting for the peer to show up
    # NCCL: communicators the payload messages take turns on, so one message's start-up overlaps the
    # previous one's transfer (a p2p operation pays a fixed handshake that a single stream serialises).
    lanes: int = 1

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a channel needs a non-empty name")
        if self.lanes < 1:
            raise ValueError(f"channel {self.name!r}: lanes must be >= 1, got {self.lanes}")
        if not 0 < self.port < 65536:
            raise ValueError(f"channel {self.name!r}: port must be in [1, 65535], got {self.port}")
        if self.timeout_s <= 0 or self.connect_timeout_s <= 0:
            raise ValueError(f"channel {self.name!r}: timeouts must be positive")


@dataclass(frozen=True)
class TransferSettings:
    """The deployment's KV transport settings as the workers get them (built from its kv_transport section,
    which holds the defaults)."""

    backend: str  # "gloo" | "nccl"
    layers_per_message: int
    timeout_s: float
    stream_layers: bool  # False: send a step's KV only after its forward (the baseline to beat)
    lanes: int  # NCCL communicators per channel that messages alternate over (ChannelSpec.lanes)


@dataclass(frozen=True)
class WorkerSpec:
    """What a prefill or decode actor is built from (the controller creates one per actor)."""

    worker_id: str
    role: Role
    engine: EngineConfig
    transfer: TransferSettings
    torch_threads: int = 1


@dataclass(frozen=True)
class WorkerRef:
    """A worker as the controller hands it out: its id, pool and Ray actor handle."""

    worker_id: str
    role: Role
    handle: object  # ray.actor.ActorHandle (kept untyped here: messages import no Ray)


@dataclass(frozen=True)
class DeploymentView:
    """The controller's state as gateways read it: the live workers' latest loads and the dead ones."""

    loads: tuple[LoadReport, ...]  # live workers only
    dead: tuple[str, ...]
    version: int  # grows whenever a worker dies or its channels change
