"""Writes each token's K and V into the paged cache at its slot (block_id * block_size + offset)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from diptych.kernels.dispatch import use_triton
from diptych.kernels.step_scratch import StepScratch, derived


@triton.jit
def _store_kv_cache_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_k_token,
    stride_k_head,
    stride_v_token,
    stride_v_head,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    num_heads,
    head_dim,
    block_size,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token)
    if slot < 0:  # padding token: nothing to store
        return
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    cols = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < num_heads) & (cols < head_dim)
    # Both caches share one layout (checked by the launcher), so one offset serves K and V.
    dst = (slot // block_size) * stride_cache_block + (slot % block_size) * stride_cache_slot
    dst += heads * stride_cache_head + cols
    k = tl.load(k_ptr + token * stride_k_token + heads * stride_k_head + cols, mask=mask)
    v = tl.load(v_ptr + token * stride_v_token + heads * stride_v_head + cols, mask=mask)
    tl.store(k_cache_ptr + dst, k, mask=mask)
    tl.store(v_cache_ptr + dst, v, mask=mask)


def store_kv_cache_triton(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    assert k.shape == v.shape and k.dim() == 3 and k.shape[0] == slot_mapping.shape[0]
    assert k.stride(2) == 1 and v.stride(2) == 1, "k and v need a contiguous last dim"
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride()
    assert k_cache.shape[2:] == k.shape[1:] and k_cache.stride(3) == 1
    assert k.dtype == v.dtype == k_cache.dtype == v_cache.dtype and slot_mapping.dtype == torch.int64
    if k.shape[0] == 0:
        return
    _store_kv_cache_kernel[(k.shape[0],)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        k.shape[1],
        k.shape[2],
        k_cache.shape[1],
        BLOCK_HEADS=triton.next_power_of_2(k.shape[1]),
        BLOCK_D=triton.next_power_of_2(k.shape[2]),
    )


def store_kv_cache_reference(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    scratch: StepScratch | None = None,
) -> None:
    # Every layer of a step has the same slot mapping: with a scratch, it is checked for tokens to skip once
    # a step, not per layer.
    if derived(scratch, "kv_cache_write.has_skips", lambda: bool((slot_mapping < 0).any())):
        valid = slot_mapping >= 0
        slot_mapping, k, v = slot_mapping[valid], k[valid], v[valid]
    # view (not flatten) so that a non-contiguous cache fails loudly instead of writing into a copy.
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def store_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    scratch: StepScratch | None = None,
) -> None:
    """k, v [T, Hk, D] into caches [num_blocks, block_size, Hk, D] at slot_mapping [T] (int64; < 0: skip).
    scratch: the step's (kernels/step_scratch.py), when slot_mapping is its own."""
    if use_triton(k):
        store_kv_cache_triton(k, v, k_cache, v_cache, slot_mapping)
    else:
        store_kv_cache_reference(k, v, k_cache, v_cache, slot_mapping, scratch=scratch)
