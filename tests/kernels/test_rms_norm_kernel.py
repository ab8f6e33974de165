"""RMSNorm and fused residual-add RMSNorm: Triton kernel vs reference, reference vs HF LlamaRMSNorm."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from diptych.kernels.rms_norm import (
    fused_add_rms_norm_reference,
    fused_add_rms_norm_triton,
    rms_norm_reference,
    rms_norm_triton,
)
from tests.kernels.helpers import Target

pytestmark = pytest.mark.usefixtures("poison_empty")
EPS = 1e-5


def hf_rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    norm = LlamaRMSNorm(x.shape[-1], eps=EPS).to(device=x.device, dtype=x.dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
        return norm(x)


def rows_view(tokens: int, hidden: int, target: Target) -> torch.Tensor:
    """[tokens, hidden] whose rows are strided (a slice of a wider buffer), as a fused projection gives."""
    return torch.randn(tokens, hidden + 24, device=target.device).to(target.dtype)[:, 8 : 8 + hidden]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_hf(dtype: torch.dtype) -> None:
    x, residual, weight = torch.randn(6, 96, dtype=dtype), torch.randn(6, 96, dtype=dtype), torch.randn(96)
    weight = weight.to(dtype)
    torch.testing.assert_close(rms_norm_reference(x, weight, EPS), hf_rms_norm(x, weight), rtol=0, atol=0)
    out, residual_out = fused_add_rms_norm_reference(x, residual, weight, EPS)
    torch.testing.assert_close(residual_out, x + residual, rtol=0, atol=0)
    torch.testing.assert_close(out, hf_rms_norm(x + residual, weight), rtol=0, atol=0)


def check_kernels(tokens: int, hidden: int, target: Target) -> None:
    x, residual = rows_view(tokens, hidden, target), rows_view(tokens, hidden, target)
    weight = torch.randn(hidden, device=target.device).to(target.dtype)
    tol: dict[str, Any] = dict(atol=target.atol, rtol=target.rtol)
    torch.testing.assert_close(rms_norm_triton(x, weight, EPS), rms_norm_reference(x, weight, EPS), **tol)
    out, residual_out = fused_add_rms_norm_triton(x, residual, weight, EPS)
    expected_out, expected_residual = fused_add_rms_norm_reference(x, residual, weight, EPS)
    torch.testing.assert_close(residual_out, expected_residual, rtol=0, atol=0)
    torch.testing.assert_close(out, expected_out, **tol)


@pytest.mark.parametrize("hidden", [64, 100])
def test_kernel_matches_reference(target: Target, hidden: int) -> None:
    check_kernels(7, hidden, target)


def test_kernel_real_shapes(gpu_target: Target) -> None:
    check_kernels(4096, 4096, gpu_target)
