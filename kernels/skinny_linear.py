"""Linear layers of a few rows on the GPU: y = x @ W^T (+ bias) for decode-sized batches, optionally with the
SwiGLU gate (silu(gate) * up over a fused gate/up weight) applied before the result leaves the kernel.

A decode step at batch 1 reads every weight once and does two FLOPs per weight: it is a stream of the weights
at HBM bandwidth, and what costs is how close to that a kernel gets. For Llama-3-8B's narrow layers (qkv
6144 x 4096, o 4096 x 4096) cuBLAS splits K and adds a reduction kernel; here each program owns BLOCK_N whole
output columns and walks all of K, so one kernel writes the result, and the MLP's gate never makes the round
trip through HBM as a [rows, 2 * intermediate] tensor. bench/sweep_skinny_linear.py measures both against the
copy bandwidth per layer shape; Linear takes this path only where it was faster there.

Two inner products: USE_DOT pads the rows to 16 and runs tl.dot (tensor cores; for 8-16 rows); otherwise
every weight tile is multiplied on the CUDA cores against each row (1-4 rows, where padding to 16 would
waste registers on zeros).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from diptych.kernels.dispatch import use_pdl, use_triton
from diptych.kernels.pdl import let_next_kernel_start, wait_for_previous_kernel

MIN_DOT_ROWS = 16  # tl.dot needs at least 16 rows: the batch is padded up to it
# Rows up to which Linear takes this kernel on a GPU. At one row it streamed Llama-3-8B's qkv, o, down and
# fused gate/up+SwiGLU faster than cuBLAS (+ the separate SwiGLU kernel) on an H200; from two rows cuBLAS was
# level or ahead on every unfused shape (bench/sweep_skinny_linear.py).
MAX_SKINNY_ROWS = 1


@dataclass(frozen=True)
class SkinnyConfig:
    """One launch shape: output columns and reduction depth per tile, warps, pipeline depth, tensor cores."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    use_dot: bool = False

    def __post_init__(self) -> None:
        assert self.block_n & (self.block_n - 1) == 0 and self.block_k & (self.block_k - 1) == 0
        assert not self.use_dot or self.block_n >= 16, "tl.dot needs N >= 16"


@triton.jit
def _skinny_linear_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_x,
    stride_w,
    stride_out,
    half,  # FUSE_SILU: the gate/up split of W's rows (columns n and half + n pair up)
    HAS_BIAS: tl.constexpr,
    FUSE_SILU: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    PDL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    m_mask = offs_m < M
    x_ptrs = x_ptr + offs_m[:, None] * stride_x + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_w + offs_k[None, :]
    up_ptrs = w_ptrs + half.to(tl.int64) * stride_w  # read only when FUSE_SILU
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    wait_for_previous_kernel(PDL)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x_tile_mask = m_mask[:, None]
            w_tile_mask = n_mask[:, None]
        else:
            k_mask = offs_k < K - k0
            x_tile_mask = m_mask[:, None] & k_mask[None, :]
            w_tile_mask = n_mask[:, None] & k_mask[None, :]
        x = tl.load(x_ptrs, mask=x_tile_mask, other=0.0)
        w = tl.load(w_ptrs, mask=w_tile_mask, other=0.0)
        if USE_DOT:
            acc += tl.dot(x, tl.trans(w))
        else:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        if FUSE_SILU:
            up = tl.load(up_ptrs, mask=w_tile_mask, other=0.0)
            if USE_DOT:
                acc_up += tl.dot(x, tl.trans(up))
            else:
                acc_up += tl.sum(x.to(tl.float32)[:, None, :] * up.to(tl.float32)[None, :, :], axis=2)
            up_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    let_next_kernel_start(PDL)

    dtype = out_ptr.dtype.element_ty
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if FUSE_SILU:
        # Each product rounded to the model dtype, then silu(gate) rounded before the multiply: the roundings
        # of the unfused linear -> silu -> mul sequence (and of HF's MLP).
        gate = acc.to(dtype).to(tl.float32)
        act = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
        acc = act * acc_up.to(dtype).to(tl.float32)
    out_ptrs = out_ptr + offs_m[:, None] * stride_out + offs_n[None, :]
    tl.store(out_ptrs, acc.to(dtype), mask=m_mask[:, None] & n_mask[None, :])


def use_skinny(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a product x @ weight^T is decode-sized for this kernel: a GPU half-precision batch of at most
    MAX_SKINNY_ROWS rows against a row-major weight, outside autograd (the kernel has no backward)."""
    return (
        x.is_cuda
        and use_triton(x)
        and x.dim() == 2
        and 0 < x.shape[0] <= MAX_SKINNY_ROWS
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype
        and weight.stride(1) == 1
        and x.stride(1) == 1
        and not torch.is_grad_enabled()
    )


def default_skinny_config(rows: int, fuse_silu: bool = False) -> SkinnyConfig:
    """The launch shape skinny_linear takes when given none. On an H200 at one row (bf16, Llama-3-8B shapes,
    bench/sweep_skinny_linear.py) four columns a program over 1024-deep tiles with two warps led at every
    unfused shape (qkv 0.82, o 0.71, down 0.91 of the copy bandwidth, where cuBLAS read 0.77, 0.59, 0.87);
    the fused gate/up reads two weight tiles a step and ran best on tensor cores (0.97; cuBLAS and the
    separate SwiGLU kernel 0.91)."""
    if rows > 2 or fuse_silu:
        return SkinnyConfig(block_n=32, block_k=256, num_warps=4, num_stages=3, use_dot=True)
    return SkinnyConfig(block_n=4, block_k=1024, num_warps=2, num_stages=1)


def skinny_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    fuse_silu: bool = False,
    config: SkinnyConfig | None = None,
) -> torch.Tensor:
    """As skinny_linear; `config` overrides the launch shape."""
    assert x.dim() == 2 and x.stride(1) == 1 and weight.dim() == 2 and weight.stride(1) == 1
    rows, in_features = x.shape
    out_features = weight.shape[0]
    assert weight.shape[1] == in_features and x.dtype == weight.dtype
    assert bias is None or (bias.shape == (out_features,) and bias.is_contiguous() and not fuse_silu)
    assert not fuse_silu or out_features % 2 == 0
    width = out_features // 2 if fuse_silu else out_features
    out = torch.empty((rows, width), dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    config = config or default_skinny_config(rows, fuse_silu)
    block_m = max(triton.next_power_of_2(rows), MIN_DOT_ROWS if config.use_dot else 1)
    pdl = use_pdl(x)
    _skinny_linear_kernel[(triton.cdiv(width, config.block_n),)](
        x,
        weight,
        weight if bias is None else bias,
        out,
        rows,
        width,
        in_features,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        width,
        HAS_BIAS=bias is not None,
        FUSE_SILU=fuse_silu,
        EVEN_K=in_features % config.block_k == 0,
        USE_DOT=config.use_dot,
        PDL=pdl,
        BLOCK_M=block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        launch_pdl=pdl,
    )
    return out


def skinny_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, fuse_silu: bool = False
) -> torch.Tensor:
    y = F.linear(x, weight, bias)
    if not fuse_silu:
        return y
    gate, up = y.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


def skinny_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, fuse_silu: bool = False
) -> torch.Tensor:
    """x [M, K] @ weight[N, K]^T (+ bias) -> [M, N]; with fuse_silu, weight is cat(gate, up) along N and the
    result silu(x @ gate^T) * (x @ up^T), [M, N / 2]."""
    if use_triton(x):
        return skinny_linear_triton(x, weight, bias, fuse_silu)
    return skinny_linear_reference(x, weight, bias, fuse_silu)
