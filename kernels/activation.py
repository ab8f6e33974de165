"""SiLU-and-mul: the SwiGLU gate of a Llama MLP over the fused gate/up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from diptych.kernels.dispatch import use_triton


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,
    out_ptr,
    stride_x,
    stride_out,
    intermediate,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + intermediate + cols, mask=mask, other=0.0).to(tl.float32)
    # Round silu(gate) to the model dtype before the product, as HF's two separate ops do.
    act = (gate * tl.sigmoid(gate)).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    assert x.dim() == 2 and x.shape[1] % 2 == 0 and x.stride(1) == 1, "x must be [T, 2I], rows contiguous"
    intermediate = x.shape[1] // 2
    out = torch.empty((x.shape[0], intermediate), dtype=x.dtype, device=x.device)
    block = min(triton.next_power_of_2(intermediate), 1024)  # 1024: 8 elements per thread at 4 warps
    grid = (x.shape[0], triton.cdiv(intermediate, block))
    _silu_and_mul_kernel[grid](x, out, x.stride(0), out.stride(0), intermediate, BLOCK=block)
    return out


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] = cat(gate, up) -> silu(gate) * up, [T, I]."""
    if use_triton(x):
        return silu_and_mul_triton(x)
    return silu_and_mul_reference(x)
