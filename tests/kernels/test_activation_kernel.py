"""SiLU-and-mul: Triton kernel vs reference, reference vs the written-out SwiGLU formula."""

from __future__ import annotations

import pytest
import torch

from diptych.kernels.activation import silu_and_mul_reference, silu_and_mul_triton
from tests.kernels.helpers import Target

pytestmark = pytest.mark.usefixtures("poison_empty")


def test_reference_matches_formula() -> None:
    x = torch.randn(5, 2 * 48, dtype=torch.float64)
    gate, up = x[:, :48], x[:, 48:]
    expected = gate / (1 + torch.exp(-gate)) * up
    torch.testing.assert_close(silu_and_mul_reference(x), expected)


def check_kernel(tokens: int, intermediate: int, target: Target) -> None:
    x = torch.randn(tokens, 2 * intermediate, device=target.device).to(target.dtype) * 3
    torch.testing.assert_close(
        silu_and_mul_triton(x), silu_and_mul_reference(x), atol=target.atol, rtol=target.rtol
    )


@pytest.mark.parametrize("intermediate", [64, 1500])  # 1500: several column blocks, a ragged last one
def test_kernel_matches_reference(target: Target, intermediate: int) -> None:
    check_kernel(3, intermediate, target)


def test_kernel_real_shapes(gpu_target: Target) -> None:
    check_kernel(4096, 14336, gpu_target)
