"""Kernel tests: Triton's interpreter on CPU (set before any @triton.jit runs), real dtypes on CUDA."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.kernels.helpers import GPU_TARGETS, TARGETS, Target


@pytest.fixture(params=TARGETS)
def target(request: pytest.FixtureRequest) -> Target:
    return request.param


@pytest.fixture(params=GPU_TARGETS)
def gpu_target(request: pytest.FixtureRequest) -> Target:
    return request.param


@pytest.fixture
def poison_empty(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every torch.empty in the test returns NaN (floats) or -1 (ints), so an output element a kernel
    launcher allocates but never writes fails the comparison instead of passing as stale memory."""
    original = torch.empty

    def poisoned(*args: object, **kwargs: object) -> torch.Tensor:
        tensor = original(*args, **kwargs)  # type: ignore[call-overload]
        return tensor.fill_(float("nan") if tensor.is_floating_point() else -1)

    monkeypatch.setattr(torch, "empty", poisoned)
    yield
