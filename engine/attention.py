"""Attention backends: how an attention layer writes a step's K/V and attends over the cache.

A layer projects q, k and v and hands them to its step's backend (AttentionMetadata.backend; None: the
paged backend here), which returns the output and, where its kernels produce one, each query row's LSE, so
that a backend attending over part of the KV (context parallelism) can merge partial results exactly
(kernels/merge_attn_states.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

import torch

from diptych.engine.forward_context import AttentionMetadata
from diptych.kernels import ops


class AttentionLayer(Protocol):
    """What a backend reads of the layer it runs for (PagedAttention in engine/model.py)."""

    layer_idx: int  # the model's own index, whatever stage runs it: the KV hook and the cache use it
    scale: float  # of the scores: head_dim ** -0.5
    k_cache: torch.Tensor  # [num_blocks, block_size, Hk, D], this layer's
    v_cache: torch.Tensor


@dataclass(frozen=True, slots=True)
class AttentionOutput:
    out: torch.Tensor  # [T, Hq, D] in q.dtype
    lse: torch.Tensor | None  # [T, Hq] fp32, natural log of each row's softmax denominator; None: not made


class AttentionBackend(ABC):
    """One way of running a layer's attention for a step."""

    @abstractmethod
    def forward(
        self,
        layer: AttentionLayer,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        cos_sin: torch.Tensor,
        meta: AttentionMetadata,
    ) -> AttentionOutput:
        """Rotate q [T, Hq, D] and k [T, Hk, D] by positions [T] (cos_sin: the [max_pos, D] RoPE table),
        write k and v [T, Hk, D] into the layer's cache at meta.slot_mapping, call meta.kv_hook with the
        rotated k, then attend as meta says (meta.scratch holds what the step's layers share). The LSE:
        always where the kernels make it for free, and from prefill too when meta.needs_lse."""


class PagedAttentionBackend(AttentionBackend):
    """The whole KV of every sequence in this process's paged cache: RoPE and the cache write in one
    kernel, then decode attention (its LSE comes free) or causal prefill attention."""

    def forward(
        self,
        layer: AttentionLayer,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        cos_sin: torch.Tensor,
        meta: AttentionMetadata,
    ) -> AttentionOutput:
        k_cache, v_cache, scratch = layer.k_cache, layer.v_cache, meta.scratch
        ops.rope_and_store_kv(
            q, k, v, positions, cos_sin, k_cache, v_cache, meta.slot_mapping, scratch=scratch
        )
        if meta.kv_hook is not None:
            meta.kv_hook(layer.layer_idx, k, v)
        if meta.is_decode:
            out, lse = ops.decode_attention(
                q, k_cache, v_cache, meta.kv_lens, meta.block_tables, layer.scale, scratch=scratch
            )
            return AttentionOutput(out, lse)
        args = (q, k_cache, v_cache, meta.cu_seqlens_q, meta.kv_lens, meta.block_tables, layer.scale)
        if meta.needs_lse:
            out, lse = ops.prefill_attention(*args, return_lse=True)
            return AttentionOutput(out, lse)
        return AttentionOutput(ops.prefill_attention(*args), None)


# Backends hold no per-step state (that lives on the metadata), so one instance serves every engine.
PAGED_BACKEND = PagedAttentionBackend()
