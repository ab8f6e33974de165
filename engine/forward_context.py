"""Per-step attention metadata, set once per forward and cleared in `finally` (never a loose global)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from diptych.kernels.step_scratch import StepScratch

if TYPE_CHECKING:
    from diptych.engine.attention import AttentionBackend

# Called by every attention layer after its K/V are computed: (layer index, k [T, Hk, D], v [T, Hk, D]).
# The prefill worker uses it to stream each layer's KV to the decode worker while the next layer computes.
KVHook = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64, where each token's K/V goes in the paged cache (-1: skip)
    cu_seqlens_q: torch.Tensor  # [B+1] int32, query rows of each sequence in the flat batch
    kv_lens: torch.Tensor  # [B] int32, cached tokens of each sequence including this step's
    block_tables: torch.Tensor  # [B, max_blocks] int32
    is_decode: bool  # every sequence has exactly one query token
    kv_hook: KVHook | None = None
    backend: AttentionBackend | None = None  # None: the paged backend (engine/attention.py)
    needs_lse: bool = False  # the backend returns each query row's LSE from prefill too (decode always)
    # What the CPU references derive from the tensors above, for the step's later layers. Not an init
    # argument: every metadata object, dataclasses.replace's included, starts with an empty one of its own.
    scratch: StepScratch = field(default_factory=StepScratch, init=False, repr=False, compare=False)


_current: ContextVar[AttentionMetadata | None] = ContextVar("diptych_attention_metadata", default=None)


@contextmanager
def forward_context(meta: AttentionMetadata) -> Iterator[AttentionMetadata]:
    token = _current.set(meta)
    try:
        yield meta
    finally:
        _current.reset(token)


def get_attention_metadata() -> AttentionMetadata:
    meta = _current.get()
    assert meta is not None, "attention layers run only inside forward_context()"
    return meta
