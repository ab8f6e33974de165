"""nn.Linear with faster paths for decode-sized batches: on a GPU, a Triton kernel for single rows
(kernels/skinny_linear.py); on the CPU, the GGUF file's own quantized blocks where the weight came from one,
oneDNN on a weight packed once, and a column-major weight layout for single rows.

On the 2-core CI host (torch 2.13, MKL 2024.2, AVX-512; fp32 SmolLM2 shapes), `F.linear` over
SmolLM2's layers at 4 and 8 rows runs 1.1-2.5x slower (by layer shape; measured in isolation) than
oneDNN's inner product on a weight reordered ahead of time: MKL re-packs the weight on every call, which
at a few rows costs more than the product.
At one to three rows MKL's GEMV path already streams the weight at memory bandwidth and wins, and at
prefill sizes the two are even, so those keep `F.linear`. The packed copy doubles the weight memory of
every layer that takes the path; it is built on first use and rebuilt when the weight changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diptych.kernels import ops
from diptych.kernels.quantized_linear import QuantizedWeight
from diptych.kernels.skinny_linear import use_skinny

MIN_PACKED_ROWS = 4
MAX_PACKED_ROWS = 96
PACK_HINT_ROWS = 8  # the row count oneDNN lays the packed weight out for: a typical decode batch
_ONEDNN = torch.backends.mkldnn.is_available()
# Up to this many rows the quantized kernel beats the fp32 product (CI host, SmolLM2 Q4_1: 2.5x at 8 rows,
# 1.15x at 32, 0.87x at 64: decoding the blocks again for every 8 rows loses to MKL somewhere between).
MAX_QUANTIZED_ROWS = 32


class Linear(nn.Linear):
    """A drop-in nn.Linear: same parameters and state dict, results equal up to fp32 summation order."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        # (weight it was packed from, that weight's version counter, packed weight)
        self._packed: tuple[torch.Tensor, int, torch.Tensor] | None = None
        # (weight it equals, that weight's version counter, the same weight as quantized blocks)
        self._quantized: tuple[torch.Tensor, int, QuantizedWeight] | None = None

    def attach_quantized(self, quantized: QuantizedWeight) -> None:
        """Serve small batches from `quantized`, which must dequantize to exactly this layer's weight: the
        copy is dropped if the weight is later changed in place or replaced."""
        if not torch.equal(quantized.dequantize(), self.weight.detach()):
            raise ValueError("quantized weight does not dequantize to the layer's weight")
        self._quantized = (self.weight, self.weight._version, quantized)

    @property
    def quantized(self) -> QuantizedWeight | None:
        cached = self._quantized
        if cached is None:
            return None
        if cached[0] is not self.weight or cached[1] != self.weight._version:
            self._quantized = None
            return None
        return cached[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_skinny(x, self.weight):
            return ops.skinny_linear(x, self.weight, self.bias)
        quantized = self._quantized_for(x)
        if quantized is not None:
            return ops.quantized_linear(x, quantized, self.bias)
        if self._takes_packed_path(x):
            return torch.ops.mkldnn._linear_pointwise(
                x.contiguous(), self._packed_weight(), self.bias, "none", [], ""
            )
        return F.linear(x, self.weight, self.bias)

    def _quantized_for(self, x: torch.Tensor) -> QuantizedWeight | None:
        """The blocks to multiply x by, if this layer has them and x is a decode-sized CPU fp32 batch."""
        if self._quantized is None or not (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and x.dim() == 2
            and x.shape[0] <= MAX_QUANTIZED_ROWS
            and not torch.is_grad_enabled()
        ):
            return None
        return self.quantized  # None once the weight is no longer the one the blocks came from

    def _takes_packed_path(self, x: torch.Tensor) -> bool:
        return (
            _ONEDNN
            and x.device.type == "cpu"
            and x.dim() == 2
            and MIN_PACKED_ROWS <= x.shape[0] <= MAX_PACKED_ROWS
            and x.dtype == self.weight.dtype == torch.float32
            and not torch.is_grad_enabled()  # the packed op has no backward
        )

    def _packed_weight(self) -> torch.Tensor:
        weight = self.weight
        cached = self._packed
        if cached is None or cached[0] is not weight or cached[1] != weight._version:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_HINT_ROWS)
            self._packed = cached = (weight, weight._version, packed)
        return cached[2]


def use_cpu_weight_layout(model: nn.Module) -> None:
    """Store the fp32 CPU weights of layers at least as wide out as in column-major ([in, out] in memory,
    still [out, in] in shape): MKL's single-row product streams that layout 15-30% faster on the CI host
    (qkv, gate_up, a 49152-row LM head), decode's batch-1 case; prefill's products take about as long
    either way, and narrow-out layers (down_proj) are faster row-major. A tied LM head re-lays the
    embedding table too, whose row lookups do not mind. Call once, after the weights are loaded."""
    for module in model.modules():
        if not isinstance(module, Linear):
            continue
        weight = module.weight
        if weight.device.type != "cpu" or weight.dtype != torch.float32:
            continue
        if module.out_features >= module.in_features and weight.is_contiguous():
            weight.data = weight.data.t().contiguous().t()
