"""x @ w.T with w kept in GGUF's block-quantized form (Q4_0, Q4_1, Q8_0), on the CPU in fp32.

The weights are the very values that dequantizing the file to fp32 gives (see csrc/quantized_linear.c), but
a decode step reads fewer bytes of them (fp32 scales and offsets included: 5.3x fewer for Q4_0 / Q4_1,
3.6x for Q8_0): on a CPU, where decode streams every weight from memory each step, that is most of a step.
The reference dequantizes and calls F.linear; the native kernel decodes each block in registers.
Dispatch: the native kernel for CPU fp32 inputs when it builds on the host (kernels.native), the
reference otherwise.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diptych.kernels import native
from diptych.kernels.dispatch import use_native

BLOCK = 32  # weights per quantization block, along the input dimension


@dataclass(frozen=True)
class QuantizedWeight:
    """A [out_features, in_features] weight: row n, block b holds codes[n, b] with scales[n, b] and, for
    4-bit codes, offsets[n, b]; weight = scale * code + offset (4-bit codes 0..15) or scale * code (8-bit
    signed codes)."""

    # 4: codes uint8 [N, K/32, 16], two a byte (low nibble: code j, high: code j + 16); 8: int8 [N, K/32, 32]
    bits: int
    codes: torch.Tensor
    scales: torch.Tensor  # fp32 [N, K/32]
    offsets: torch.Tensor | None  # fp32 [N, K/32]; None for 8-bit codes

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        n, blocks = self.scales.shape
        expected = (n, blocks, BLOCK // 2 if self.bits == 4 else BLOCK)
        if tuple(self.codes.shape) != expected or self.codes.dtype != torch.uint8:
            raise ValueError(
                f"codes must be uint8 {expected}, got {self.codes.dtype} {tuple(self.codes.shape)}"
            )
        if (self.offsets is None) != (self.bits == 8):
            raise ValueError("4-bit codes need offsets, 8-bit codes take none")
        factors = [self.scales] + ([] if self.offsets is None else [self.offsets])
        if not all(p.is_contiguous() and p.device.type == "cpu" for p in [self.codes, *factors]):
            raise ValueError("quantized weights must be contiguous CPU tensors (the kernel reads them raw)")
        if any(p.dtype != torch.float32 for p in factors):
            raise ValueError("quantized scales and offsets must be float32")

    @property
    def shape(self) -> tuple[int, int]:
        n, blocks = self.scales.shape
        return n, blocks * BLOCK

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight, computed as gguf-py computes it (so equal to it element for element)."""
        if self.bits == 4:
            codes = torch.cat([self.codes & 0x0F, self.codes >> 4], dim=-1).float()
            assert self.offsets is not None
            w = self.scales[..., None] * codes + self.offsets[..., None]
        else:
            w = self.scales[..., None] * self.codes.view(torch.int8).float()
        return w.reshape(self.shape)

    @staticmethod
    def cat(parts: list[QuantizedWeight]) -> QuantizedWeight:
        """Rows of several weights stacked (fused projections); all parts must share one code width."""
        if len({p.bits for p in parts}) != 1:
            raise ValueError("cannot fuse weights quantized with different code widths")
        offsets = [p.offsets for p in parts]
        return QuantizedWeight(
            parts[0].bits,
            torch.cat([p.codes for p in parts]),
            torch.cat([p.scales for p in parts]),
            None if offsets[0] is None else torch.cat([o for o in offsets if o is not None]),
        )


def quantized_linear_reference(
    x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    return F.linear(x, weight.dequantize(), bias)


def quantized_linear(
    x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., K] fp32 -> [..., N] fp32."""
    kernel = _NATIVE() if _takes_native_path(x) else None
    if kernel is None:
        return quantized_linear_reference(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    n, k = weight.shape
    if rows.shape[1] != k:
        raise ValueError(f"input has {rows.shape[1]} features, the weight takes {k}")
    out = torch.empty(rows.shape[0], n, dtype=torch.float32)
    offsets = weight.offsets
    kernel(
        rows.data_ptr(),
        rows.shape[0],
        rows.stride(0),
        n,
        k,
        weight.bits,
        weight.codes.data_ptr(),
        weight.scales.data_ptr(),
        None if offsets is None else offsets.data_ptr(),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], n)


_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
_NATIVE = functools.partial(
    native.native_function,
    "quantized_linear",
    "quantized_linear",
    (_ptr, _i64, _i64, _i64, _i64, ctypes.c_int, _ptr, _ptr, _ptr, _ptr, ctypes.c_int),
)


def _takes_native_path(x: torch.Tensor) -> bool:
    return (
        use_native(x)
        and x.dtype == torch.float32
        and not (torch.is_grad_enabled() and x.requires_grad)  # the kernel has no backward
    )
