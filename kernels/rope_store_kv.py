"""RoPE on q and k in place, then k and v written into the paged cache at their slots: kernels/rope.py and
kernels/kv_cache_write.py in one launch.

The attention layer needs both before it reads the cache, and at decode sizes each is a launch that moves a
few kilobytes (about 2.3 and 1.3 us a layer on an H200 at batch 1), so one kernel saves a launch per layer.
The results are those of apply_rope followed by store_kv_cache: q and k rotated in place (k as it went
into the cache, for a KV hook that reads it), a slot < 0 skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from diptych.kernels.dispatch import use_pdl, use_triton
from diptych.kernels.kv_cache_write import store_kv_cache
from diptych.kernels.pdl import let_next_kernel_start, wait_for_previous_kernel
from diptych.kernels.rope import apply_rope, load_rotation, rotate_heads
from diptych.kernels.step_scratch import StepScratch


@triton.jit
def _rope_store_kv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    positions_ptr,
    cos_sin_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_q_token,
    stride_q_head,
    stride_k_token,
    stride_k_head,
    stride_v_token,
    stride_v_head,
    stride_cos_sin,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    num_q_heads,
    num_kv_heads,
    half_dim,
    block_size,
    BLOCK_Q_HEADS: tl.constexpr,
    BLOCK_KV_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    PDL: tl.constexpr,
):
    token = tl.program_id(0)
    wait_for_previous_kernel(PDL)
    slot = tl.load(slot_mapping_ptr + token)
    cos, sin = load_rotation(positions_ptr, cos_sin_ptr, token, stride_cos_sin, half_dim, BLOCK_HALF)
    cols = tl.arange(0, BLOCK_HALF)
    rotate_heads(
        q_ptr + token * stride_q_token,
        stride_q_head,
        num_q_heads,
        cos,
        sin,
        half_dim,
        BLOCK_Q_HEADS,
        BLOCK_HALF,
    )

    heads = tl.arange(0, BLOCK_KV_HEADS)[:, None]
    mask = (heads < num_kv_heads) & (cols[None, :] < half_dim)
    k1_ptr = k_ptr + token * stride_k_token + heads * stride_k_head + cols[None, :]
    v1_ptr = v_ptr + token * stride_v_token + heads * stride_v_head + cols[None, :]
    k1 = tl.load(k1_ptr, mask=mask, other=0.0).to(tl.float32)
    k2 = tl.load(k1_ptr + half_dim, mask=mask, other=0.0).to(tl.float32)
    dtype = k_ptr.dtype.element_ty
    rotated1 = (k1 * cos - k2 * sin).to(dtype)
    rotated2 = (k2 * cos + k1 * sin).to(dtype)
    tl.store(k1_ptr, rotated1, mask=mask)
    tl.store(k1_ptr + half_dim, rotated2, mask=mask)
    let_next_kernel_start(PDL)
    if slot >= 0:  # < 0: a padding token, nothing to store
        # Both caches share one layout (checked by the launcher), so one offset serves K and V.
        dst = (slot // block_size) * stride_cache_block + (slot % block_size) * stride_cache_slot
        dst += heads * stride_cache_head + cols[None, :]
        tl.store(k_cache_ptr + dst, rotated1, mask=mask)
        tl.store(k_cache_ptr + dst + half_dim, rotated2, mask=mask)
        tl.store(v_cache_ptr + dst, tl.load(v1_ptr, mask=mask), mask=mask)
        tl.store(v_cache_ptr + dst + half_dim, tl.load(v1_ptr + half_dim, mask=mask), mask=mask)


def rope_and_store_kv_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    assert q.dim() == 3 and k.shape == v.shape and k.dim() == 3
    assert q.shape[0] == k.shape[0] == positions.shape[0] == slot_mapping.shape[0]
    assert q.shape[2] == k.shape[2] == cos_sin_cache.shape[1] and q.shape[2] % 2 == 0
    assert q.stride(2) == 1 and k.stride(2) == 1 and v.stride(2) == 1, "q, k, v need a contiguous last dim"
    assert q.dtype == k.dtype == v.dtype == k_cache.dtype == v_cache.dtype
    assert positions.dtype == slot_mapping.dtype == torch.int64
    assert cos_sin_cache.dtype == torch.float32 and cos_sin_cache.stride(1) == 1
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride()
    assert k_cache.shape[2:] == k.shape[1:] and k_cache.stride(3) == 1
    if q.shape[0] == 0:
        return
    half_dim = q.shape[2] // 2
    pdl = use_pdl(q)
    _rope_store_kv_kernel[(q.shape[0],)](
        q,
        k,
        v,
        positions,
        cos_sin_cache,
        k_cache,
        v_cache,
        slot_mapping,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        cos_sin_cache.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        q.shape[1],
        k.shape[1],
        half_dim,
        k_cache.shape[1],
        BLOCK_Q_HEADS=triton.next_power_of_2(q.shape[1]),
        BLOCK_KV_HEADS=triton.next_power_of_2(k.shape[1]),
        BLOCK_HALF=triton.next_power_of_2(half_dim),
        PDL=pdl,
        launch_pdl=pdl,
    )


def rope_and_store_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    scratch: StepScratch | None = None,
) -> None:
    """apply_rope(q [T, Hq, D], k [T, Hk, D]) in place, then store_kv_cache(k, v [T, Hk, D]) into caches
    [num_blocks, block_size, Hk, D] at slot_mapping [T] (int64; < 0: skip). scratch: the step's
    (kernels/step_scratch.py), when positions and slot_mapping are its own."""
    if use_triton(q):
        rope_and_store_kv_triton(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping)
    else:
        apply_rope(q, k, positions, cos_sin_cache, scratch=scratch)
        store_kv_cache(k, v, k_cache, v_cache, slot_mapping, scratch=scratch)
