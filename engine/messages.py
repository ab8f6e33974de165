"""Typed messages that cross a boundary: gateway <-> workers, prefill <-> decode, engine <-> caller.

Every Ray actor call carries one of these dataclasses; nothing else crosses a process boundary.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from diptych.engine.llm_engine import EngineConfig


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
    # Timing, filled where known: when the first token was sampled (epoch seconds), and how long the
    # request's KV took from reservation to landing on the decode worker (on its first decode delta).
    first_token_time: float | None = None
    kv_transfer_s: float | None = None
    kv_landed_time: float | None = None  # epoch seconds the last layer of the prompt's KV landed
    queue_s: float | None = None  # arrival at the worker to its first scheduled step (first delta only)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class LoadReport:
    """What a worker tells the router about itself."""

    worker_id: str
    role: str  # "prefill" | "decode" | "colocated"
    running: int
    waiting: int
    used_blocks: int
    total_blocks: int
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TransferSettings:
    backend: str  # "gloo" | "nccl"
    layers_per_message: int = 4
    timeout_s: float = 30.0
    stream_layers: bool = True  # False: send a step's KV only after its forward (the baseline to beat)
    lanes: int = 2  # NCCL communicators per channel that messages alternate over (ChannelSpec.lanes)


@dataclass(frozen=True)
class WorkerSpec:
    """What a prefill or decode actor is built from (the controller creates one per actor)."""

    worker_id: str
    role: str  # "prefill" | "decode"
    engine: EngineConfig
    transfer: TransferSettings
    torch_threads: int = 1
