"""RMSNorm, plain and with the residual add fused in front (HF Llama semantics)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from diptych.kernels.dispatch import use_pdl, use_triton
from diptych.kernels.pdl import let_next_kernel_start, wait_for_previous_kernel


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    residual_out_ptr,
    stride_x,
    stride_residual,
    stride_out,
    stride_residual_out,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PDL: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < hidden
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # no kernel writes it
    wait_for_previous_kernel(PDL)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0)
        # Round the sum to the model dtype first, as HF adds the residual in that dtype.
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_residual_out + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    inv_rms = tl.math.rsqrt(tl.sum(x32 * x32, axis=0) / hidden + eps)
    # HF casts the normalised row back to the model dtype before the weight multiply.
    normed = (x32 * inv_rms).to(x_ptr.dtype.element_ty).to(tl.float32)
    let_next_kernel_start(PDL)
    tl.store(out_ptr + row * stride_out + cols, (normed * weight).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float) -> tuple:
    assert x.dim() == 2 and x.stride(1) == 1, "x must be [T, H] with contiguous rows"
    assert weight.shape == (x.shape[1],) and weight.is_contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    residual_out = out
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(1) == 1
        residual_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block_h = triton.next_power_of_2(x.shape[1])
    pdl = use_pdl(x)
    _rms_norm_kernel[(x.shape[0],)](
        x,
        x if residual is None else residual,
        weight,
        out,
        residual_out,
        x.stride(0),
        x.stride(0) if residual is None else residual.stride(0),
        out.stride(0),
        residual_out.stride(0),
        x.shape[1],
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK_H=block_h,
        PDL=pdl,
        num_warps=min(max(block_h // 256, 1), 8),  # ~8 elements per thread per row
        launch_pdl=pdl,
    )
    return out, residual_out


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(x, residual, weight, eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # HF's own ops, which on CPU beat F.rms_norm (more kernels, two scalar-to-tensor copies) in a real step.
    x32 = x.float()
    normed = x32 * x32.pow(2).mean(dim=-1, keepdim=True).add_(eps).rsqrt_()
    return (weight * normed.to(x.dtype)).to(x.dtype)


def fused_add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    residual_out = x + residual
    return rms_norm_reference(residual_out, weight, eps), residual_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, H] -> RMSNorm(x) * weight, computed in fp32, returned in x.dtype."""
    if use_triton(x):
        return rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual); the sum is taken in x.dtype."""
    if use_triton(x):
        return fused_add_rms_norm_triton(x, residual, weight, eps)
    return fused_add_rms_norm_reference(x, residual, weight, eps)
