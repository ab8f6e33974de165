"""Block-quantized GGUF weights: their split into codes and scales against gguf-py's own dequantization, and
the C kernel against the reference (dequantize, then F.linear)."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from diptych.engine.gguf_weights import QUANTIZED_KERNEL_TYPES, split_blocks
from diptych.kernels.quantized_linear import QuantizedWeight, quantized_linear, quantized_linear_reference

# The module, not the function `kernels` re-exports under the same name.
quantized_linear_module = importlib.import_module("diptych.kernels.quantized_linear")
pytestmark = pytest.mark.usefixtures("poison_empty")
Q = GGMLQuantizationType
TYPES = [Q.Q4_0, Q.Q4_1, Q.Q8_0]


def random_blocks(qtype: GGMLQuantizationType, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Raw GGUF blocks with random codes and fp16 scales (and mins) of realistic size and either sign."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (rows, cols // 32, QUANTIZED_KERNEL_TYPES[qtype]), dtype=np.uint8)
    fields = 2 if qtype == Q.Q4_1 else 1
    halves = rng.normal(0.0, 0.02, (rows, cols // 32, fields)).astype(np.float16)
    blocks[..., : 2 * fields] = halves.view(np.uint8).reshape(rows, cols // 32, 2 * fields)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("qtype", TYPES)
def test_split_blocks_dequantize_exactly_as_gguf_py(qtype: GGMLQuantizationType) -> None:
    raw = random_blocks(qtype, 7, 96)
    weight = split_blocks(raw, qtype, 7, 96)
    expected = torch.from_numpy(dequantize(raw, qtype).reshape(7, 96))
    assert torch.equal(weight.dequantize(), expected)  # bit for bit: the same weights, not close ones


def test_weights_refuse_malformed_parts() -> None:
    weight = split_blocks(random_blocks(Q.Q4_1, 4, 64), Q.Q4_1, 4, 64)
    with pytest.raises(ValueError, match="offsets"):
        QuantizedWeight(4, weight.codes, weight.scales, None)
    with pytest.raises(ValueError, match="codes must be uint8"):
        QuantizedWeight(8, weight.codes, weight.scales, None)
    with pytest.raises(ValueError, match="contiguous"):
        QuantizedWeight(4, weight.codes[:, ::2], weight.scales[:, ::2], weight.offsets)
    with pytest.raises(ValueError, match="different code widths"):
        QuantizedWeight.cat([weight, split_blocks(random_blocks(Q.Q8_0, 4, 64), Q.Q8_0, 4, 64)])


def test_cat_and_rows_keep_each_row() -> None:
    parts = [split_blocks(random_blocks(Q.Q4_0, n, 64, seed=n), Q.Q4_0, n, 64) for n in (3, 5)]
    fused = QuantizedWeight.cat(parts)
    assert fused.shape == (8, 64)
    assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))
    assert torch.equal(fused.dequantize()[3:], parts[1].dequantize())


def native_or_skip() -> Callable[..., None]:
    kernel = quantized_linear_module._NATIVE()
    if kernel is None:
        pytest.skip("no C compiler on this host")
    return kernel


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 17, 40])  # every pass width, and several passes
@pytest.mark.parametrize(("out_features", "in_features"), [(1, 32), (17, 96), (50, 576)])
def test_native_kernel_matches_reference(
    qtype: GGMLQuantizationType, rows: int, out_features: int, in_features: int
) -> None:
    native_or_skip()
    weight = split_blocks(random_blocks(qtype, out_features, in_features), qtype, out_features, in_features)
    x = torch.randn(rows, in_features)
    out = quantized_linear(x, weight)
    assert_close_to_exact(out, x, weight.dequantize())
    assert_close_to_exact(quantized_linear_reference(x, weight), x, weight.dequantize())


def assert_close_to_exact(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """Within fp32 summation error of the float64 product: a few ulps of the sum of |x| |w| terms (an
    fp32 sum's error scales with that sum, not with the possibly cancelled result)."""
    exact = x.double() @ w.double().T
    scale = x.double().abs() @ w.double().abs().T
    assert out.dtype == torch.float32 and not out.isnan().any()
    assert bool(((out.double() - exact).abs() <= 4e-6 * scale + 1e-12).all())


def test_native_kernel_takes_strided_rows_leading_dims_and_bias() -> None:
    native_or_skip()
    weight = split_blocks(random_blocks(Q.Q4_1, 19, 64), Q.Q4_1, 19, 64)
    wide = torch.randn(2, 3, 100)
    x = wide[..., 10:74]  # rows 100 floats apart: the kernel reads them in place
    bias = torch.randn(19)
    out = quantized_linear(x, weight, bias)
    assert out.shape == (2, 3, 19)
    assert_close_to_exact((out - bias).reshape(6, 19), x.reshape(6, 64), weight.dequantize())
    with pytest.raises(ValueError, match="takes 64"):
        quantized_linear(torch.randn(2, 32), weight)


def test_the_reference_runs_when_native_kernels_are_off(monkeypatch: pytest.MonkeyPatch) -> None:
    weight = split_blocks(random_blocks(Q.Q8_0, 5, 64), Q.Q8_0, 5, 64)
    x = torch.randn(3, 64)
    monkeypatch.setattr(quantized_linear_module, "_NATIVE", lambda: pytest.fail("native kernel called"))
    monkeypatch.setenv("DIPTYCH_NATIVE_KERNELS", "0")
    torch.testing.assert_close(quantized_linear(x, weight), F.linear(x, weight.dequantize()))
