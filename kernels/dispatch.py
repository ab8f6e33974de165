"""Chooses, per call, between a Triton kernel and its torch reference.

`DIPTYCH_KERNELS` is read here and nowhere else: `auto` (default) runs Triton for CUDA tensors and the
reference otherwise; `reference` and `triton` force one path (`triton` on CPU needs TRITON_INTERPRET=1).
It is read on every call, not cached, so tests can switch it; the dict lookup costs well under a microsecond.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

KernelMode = Literal["auto", "reference", "triton"]
_MODES: tuple[KernelMode, ...] = ("auto", "reference", "triton")


def kernel_mode() -> KernelMode:
    mode = os.environ.get("DIPTYCH_KERNELS", "auto")
    if mode not in _MODES:
        raise ValueError(f"DIPTYCH_KERNELS must be one of {_MODES}, got {mode!r}")
    return mode  # type: ignore[return-value]


def use_triton(x: torch.Tensor) -> bool:
    mode = kernel_mode()
    if mode == "auto":
        return x.is_cuda
    return mode == "triton"
