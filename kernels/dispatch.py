"""Chooses, per call, between a Triton kernel, a C kernel (kernels.native) and the torch reference.

The environment is read here and nowhere else. `DIPTYCH_KERNELS`: `auto` (default) runs Triton for CUDA
tensors, and for CPU tensors the C kernel where an op has one, else the reference; `reference` and `triton`
force one path (`triton` on CPU needs TRITON_INTERPRET=1; an op without a Triton kernel then takes its C
one). `DIPTYCH_NATIVE_KERNELS=0` turns the C kernels off. Both are read on every call, not cached, so tests
can switch them; the dict lookups cost well under a microsecond. `DIPTYCH_PDL` (see kernels/pdl.py): `1`
(default) lets the one-row decode kernels launch with programmatic dependent launch on Hopper and newer,
`0` launches them as plain stream-ordered kernels.
"""

from __future__ import annotations

import functools
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


def native_enabled() -> bool:
    return os.environ.get("DIPTYCH_NATIVE_KERNELS", "1") not in ("0", "false", "no")


def use_native(x: torch.Tensor) -> bool:
    """Whether a CPU tensor may take an op's C kernel (the op still checks dtypes and that it built)."""
    return x.device.type == "cpu" and kernel_mode() != "reference" and native_enabled()


def use_triton(x: torch.Tensor) -> bool:
    mode = kernel_mode()
    if mode == "auto":
        return x.is_cuda
    return mode == "triton"


# Token rows up to which the kernels launch with PDL. A one-row decode step is a chain of Triton kernels
# (kernels/pdl.py, H200: the B1 graph replay 4.21 -> 4.15 ms); from two rows the linear
# layers are cuBLAS kernels, which do not take part, and at B64 the step was 0.7% slower with it.
PDL_MAX_ROWS = 1


def use_pdl(x: torch.Tensor) -> bool:
    """Whether a Triton kernel over x (token rows first) launches with programmatic dependent launch
    (kernels/pdl.py: compute capability 9.0 and newer)."""
    if not x.is_cuda or x.shape[0] > PDL_MAX_ROWS:
        return False
    if os.environ.get("DIPTYCH_PDL", "1") in ("0", "false", "no"):
        return False
    return _compute_capability(x.device.index or 0) >= (9, 0)


@functools.cache
def _compute_capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)
