"""Exact merge of two partial attentions over disjoint key sets, from their outputs and log-sum-exps."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from diptych.kernels.dispatch import use_triton


@triton.jit
def _merge_attn_states_kernel(
    out_a_ptr,
    lse_a_ptr,
    out_b_ptr,
    lse_b_ptr,
    out_ptr,
    lse_ptr,
    stride_out_a_row,
    stride_out_a_head,
    stride_out_b_row,
    stride_out_b_head,
    stride_out_row,
    stride_out_head,
    num_heads,
    head_dim,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    head = tl.program_id(1)
    lse_a = tl.load(lse_a_ptr + row * num_heads + head)
    lse_b = tl.load(lse_b_ptr + row * num_heads + head)
    lse_max = tl.maximum(lse_a, lse_b)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # both empty: weights 0, not NaN
    weight_a = tl.exp(lse_a - lse_max)
    weight_b = tl.exp(lse_b - lse_max)
    total = weight_a + weight_b
    empty = total == 0.0
    total = tl.where(empty, 1.0, total)
    tl.store(lse_ptr + row * num_heads + head, tl.where(empty, float("-inf"), lse_max + tl.log(total)))
    cols = tl.arange(0, BLOCK_D)
    mask = cols < head_dim
    out_a = tl.load(out_a_ptr + row * stride_out_a_row + head * stride_out_a_head + cols, mask=mask)
    out_b = tl.load(out_b_ptr + row * stride_out_b_row + head * stride_out_b_head + cols, mask=mask)
    out = out_a.to(tl.float32) * (weight_a / total) + out_b.to(tl.float32) * (weight_b / total)
    tl.store(
        out_ptr + row * stride_out_row + head * stride_out_head + cols,
        out.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


def merge_attn_states_triton(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    assert out_a.shape == out_b.shape and out_a.dim() == 3 and out_a.dtype == out_b.dtype
    assert out_a.stride(2) == 1 and out_b.stride(2) == 1
    assert lse_a.shape == lse_b.shape == out_a.shape[:2] and lse_a.dtype == lse_b.dtype == torch.float32
    assert lse_a.is_contiguous() and lse_b.is_contiguous()
    rows, heads, head_dim = out_a.shape
    out = torch.empty(out_a.shape, dtype=out_a.dtype, device=out_a.device)
    lse = torch.empty(lse_a.shape, dtype=torch.float32, device=lse_a.device)
    if rows == 0:
        return out, lse
    _merge_attn_states_kernel[(rows, heads)](
        out_a,
        lse_a,
        out_b,
        lse_b,
        out,
        lse,
        out_a.stride(0),
        out_a.stride(1),
        out_b.stride(0),
        out_b.stride(1),
        out.stride(0),
        out.stride(1),
        heads,
        head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
    )
    return out, lse


def merge_attn_states_reference(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    lse_max = torch.maximum(lse_a, lse_b)
    lse_max = lse_max.masked_fill(lse_max == float("-inf"), 0.0)  # both empty: weights 0, not NaN
    weight_a = torch.exp(lse_a - lse_max)
    weight_b = torch.exp(lse_b - lse_max)
    total = weight_a + weight_b
    lse = lse_max + torch.log(total)
    total = total.masked_fill(total == 0.0, 1.0)
    out = out_a.float() * (weight_a / total).unsqueeze(-1) + out_b.float() * (weight_b / total).unsqueeze(-1)
    return out.to(out_a.dtype), lse


def merge_attn_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merges outs [N, H, D] with lse [N, H] fp32 (natural log); a side with lse -inf contributes nothing."""
    if use_triton(out_a):
        return merge_attn_states_triton(out_a, lse_a, out_b, lse_b)
    return merge_attn_states_reference(out_a, lse_a, out_b, lse_b)
