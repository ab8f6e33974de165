"""Decode-sized linear layers: the Triton kernel (both inner products, with bias and with the SwiGLU gate
fused) against F.linear, and when Linear and the MLP take it."""

from __future__ import annotations

import pytest
import torch

from diptych.kernels.skinny_linear import (
    SkinnyConfig,
    default_skinny_config,
    skinny_linear_reference,
    skinny_linear_triton,
    use_skinny,
)
from tests.kernels.helpers import Target

pytestmark = pytest.mark.usefixtures("poison_empty")

CUDA_CORES = SkinnyConfig(block_n=8, block_k=32)
TENSOR_CORES = SkinnyConfig(block_n=16, block_k=32, num_stages=2, use_dot=True)


def check_kernel(
    rows: int,
    out_features: int,
    in_features: int,
    target: Target,
    config: SkinnyConfig | None,
    bias: bool = False,
    fuse_silu: bool = False,
) -> None:
    # x is a row slice of a wider buffer: the kernel must follow its row stride.
    x = torch.randn(rows, in_features + 16, device=target.device).to(target.dtype)[:, 8 : 8 + in_features]
    weight = (torch.randn(out_features, in_features, device=target.device) * in_features**-0.5).to(
        target.dtype
    )
    b = torch.randn(out_features, device=target.device).to(target.dtype) if bias else None
    got = skinny_linear_triton(x, weight, b, fuse_silu, config)
    # The reference in fp32 (products summed in a different order than any kernel's).
    want = skinny_linear_reference(x.float(), weight.float(), None if b is None else b.float(), fuse_silu)
    assert got.shape == (rows, out_features // 2 if fuse_silu else out_features)
    torch.testing.assert_close(got.float(), want, atol=target.atol, rtol=target.rtol)


@pytest.mark.parametrize("rows", [1, 2, 3])
@pytest.mark.parametrize(
    ("out_features", "in_features"), [(40, 96), (64, 80)]
)  # ragged N tiles; K not a tile
def test_cuda_core_product(target: Target, rows: int, out_features: int, in_features: int) -> None:
    check_kernel(rows, out_features, in_features, target, CUDA_CORES, bias=True)


@pytest.mark.parametrize("rows", [1, 5, 16])
def test_tensor_core_product(target: Target, rows: int) -> None:
    check_kernel(rows, 40, 96, target, TENSOR_CORES, bias=True)


@pytest.mark.parametrize("config", [CUDA_CORES, TENSOR_CORES], ids=["cuda-cores", "tensor-cores"])
@pytest.mark.parametrize("rows", [1, 3])
def test_fused_swiglu_gate(target: Target, config: SkinnyConfig, rows: int) -> None:
    check_kernel(rows, 2 * 48, 64, target, config, fuse_silu=True)


def test_fused_gate_rounds_like_the_unfused_ops(target: Target) -> None:
    """silu(gate) * up with each product and silu(gate) rounded to the model dtype, as linear -> silu_and_mul
    (and HF's MLP) round them."""
    x = torch.randn(1, 64, device=target.device).to(target.dtype)
    weight = torch.randn(96, 64, device=target.device).to(target.dtype)
    got = skinny_linear_triton(x, weight, fuse_silu=True, config=CUDA_CORES)
    gate, up = (x.float() @ weight.float().T).to(target.dtype).chunk(2, dim=-1)
    act = torch.nn.functional.silu(gate.float()).to(target.dtype)
    want = (act.float() * up.float()).to(target.dtype)
    torch.testing.assert_close(got, want, atol=target.atol, rtol=target.rtol)


def test_default_configs_are_valid_launches(target: Target) -> None:
    for rows in (1, 2, 4):
        for fuse_silu in (False, True):
            check_kernel(rows, 64, 2048, target, default_skinny_config(rows, fuse_silu), fuse_silu=fuse_silu)


def test_only_decode_sized_gpu_half_batches_take_it() -> None:
    weight = torch.empty(8, 16, dtype=torch.bfloat16)
    x = torch.empty(1, 16, dtype=torch.bfloat16)
    assert not use_skinny(x, weight)  # a CPU tensor never does
    if torch.cuda.is_available():
        cuda_w, cuda_x = weight.cuda(), x.cuda()
        assert use_skinny(cuda_x, cuda_w)
        assert not use_skinny(torch.empty(64, 16, dtype=torch.bfloat16, device="cuda"), cuda_w)
        assert not use_skinny(cuda_x.float(), cuda_w.float())
        assert not use_skinny(cuda_x, cuda_w.t().contiguous().t())  # column-major weight


@pytest.mark.parametrize(
    ("out_features", "in_features", "fuse_silu"),
    [
        (6144, 4096, False),
        (4096, 4096, False),
        (28672, 4096, True),
        (4096, 14336, False),
        (128256, 4096, False),
    ],
    ids=["qkv", "o", "gate_up+silu", "down", "lm_head"],
)
def test_kernel_real_shapes(gpu_target: Target, out_features: int, in_features: int, fuse_silu: bool) -> None:
    check_kernel(1, out_features, in_features, gpu_target, None, fuse_silu=fuse_silu)
