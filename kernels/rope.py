"""Rotary position embedding, rotate-half (NeoX) layout as in HF Llama, applied in place to q and k.

The cos/sin table carries any frequency scaling (Llama-3 included): it is built by the engine
(engine/rope.py) as [max_pos, D] fp32 = cat(cos, sin) of the D/2 frequencies.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from diptych.kernels.dispatch import use_triton
from diptych.kernels.step_scratch import StepScratch, derived


@triton.jit
def rotate_heads(
    base_ptr,
    stride_head,
    num_heads,
    cos,
    sin,
    half_dim,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < num_heads) & (cols < half_dim)
    ptr1 = base_ptr + heads * stride_head + cols
    x1 = tl.load(ptr1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr1 + half_dim, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptr1, (x1 * cos - x2 * sin).to(base_ptr.dtype.element_ty), mask=mask)
    tl.store(ptr1 + half_dim, (x2 * cos + x1 * sin).to(base_ptr.dtype.element_ty), mask=mask)


@triton.jit
def load_rotation(positions_ptr, cos_sin_ptr, token, stride_cos_sin, half_dim, BLOCK_HALF: tl.constexpr):
    """(cos, sin) rows [1, BLOCK_HALF] of a token's position, from the [max_pos, D] cat(cos, sin) table."""
    position = tl.load(positions_ptr + token)
    cols = tl.arange(0, BLOCK_HALF)
    row_ptr = cos_sin_ptr + position * stride_cos_sin
    cos = tl.load(row_ptr + cols, mask=cols < half_dim, other=0.0)[None, :]
    sin = tl.load(row_ptr + half_dim + cols, mask=cols < half_dim, other=0.0)[None, :]
    return cos, sin


@triton.jit
def _apply_rope_kernel(
    q_ptr,
    k_ptr,
    positions_ptr,
    cos_sin_ptr,
    stride_q_token,
    stride_q_head,
    stride_k_token,
    stride_k_head,
    stride_cos_sin,
    num_q_heads,
    num_k_heads,
    half_dim,
    BLOCK_Q_HEADS: tl.constexpr,
    BLOCK_K_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0)
    cos, sin = load_rotation(positions_ptr, cos_sin_ptr, token, stride_cos_sin, half_dim, BLOCK_HALF)
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
    rotate_heads(
        k_ptr + token * stride_k_token,
        stride_k_head,
        num_k_heads,
        cos,
        sin,
        half_dim,
        BLOCK_K_HEADS,
        BLOCK_HALF,
    )


def apply_rope_triton(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> None:
    assert q.dim() == 3 and k.dim() == 3 and q.shape[0] == k.shape[0] == positions.shape[0]
    assert q.shape[2] == k.shape[2] == cos_sin_cache.shape[1] and q.shape[2] % 2 == 0
    assert q.stride(2) == 1 and k.stride(2) == 1, "q and k need a contiguous last dim"
    assert q.dtype == k.dtype and positions.dtype == torch.int64
    assert cos_sin_cache.dtype == torch.float32 and cos_sin_cache.stride(1) == 1
    if q.shape[0] == 0:
        return
    half_dim = q.shape[2] // 2
    _apply_rope_kernel[(q.shape[0],)](
        q,
        k,
        positions,
        cos_sin_cache,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos_sin_cache.stride(0),
        q.shape[1],
        k.shape[1],
        half_dim,
        BLOCK_Q_HEADS=triton.next_power_of_2(q.shape[1]),
        BLOCK_K_HEADS=triton.next_power_of_2(k.shape[1]),
        BLOCK_HALF=triton.next_power_of_2(half_dim),
    )


def apply_rope_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    *,
    scratch: StepScratch | None = None,
) -> None:
    # The table rows of the step's positions are the same for every layer: built once a step with a scratch.
    cos, sin = derived(scratch, "rope.rotation", lambda: _rotation_table(positions, cos_sin_cache))
    for x in (q, k):
        # (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) = x * (cos, cos) + (x2, x1) * (-sin, sin), in place:
        # three ops per tensor (fp32 x.float() is x itself), which is what the CPU path pays for.
        x32 = x.float()
        swapped = x32.roll(x.shape[-1] // 2, dims=-1)
        x32.mul_(cos).addcmul_(swapped, sin)
        if x32 is not x:
            x.copy_(x32)


def _rotation_table(
    positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """([T, 1, D] (cos, cos), [T, 1, D] (-sin, sin)) of each token's position."""
    cos, sin = cos_sin_cache.index_select(0, positions).unsqueeze(1).chunk(2, dim=-1)
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    *,
    scratch: StepScratch | None = None,
) -> None:
    """Rotates q [T, Hq, D] and k [T, Hk, D] in place by positions [T] (int64); computed in fp32. scratch:
    the step's (kernels/step_scratch.py), when positions and the table are its own."""
    if use_triton(q):
        apply_rope_triton(q, k, positions, cos_sin_cache)
    else:
        apply_rope_reference(q, k, positions, cos_sin_cache, scratch=scratch)
