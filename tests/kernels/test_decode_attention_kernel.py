"""Paged split-KV decode attention: reference vs dense attention, Triton kernel vs reference, LSE included."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import pytest
import torch

from diptych.kernels.decode_attention import (
    DecodeTileConfig,
    decode_attention_native,
    decode_attention_reference,
    decode_attention_triton,
)
from tests.kernels.helpers import Target, make_paged_kv, naive_attention

# The module, not the function `kernels` re-exports under the same name.
decode_attention_module = importlib.import_module("diptych.kernels.decode_attention")

pytestmark = pytest.mark.usefixtures("poison_empty")
CPU_FP32 = Target("cpu", torch.float32, atol=1e-5, rtol=1e-5)
GQA = [(4, 4), (6, 2), (8, 2), (8, 1)]  # query/KV head ratios 1, 3, 4, 8
KV_LENS = [37, 0, 1, 64, 129]  # ragged, one empty row, lengths on and off block (8) and tile (16) edges


def test_reference_matches_dense_attention() -> None:
    paged = make_paged_kv(KV_LENS, 2, 32, 8, CPU_FP32)
    q = torch.randn(len(KV_LENS), 6, 32)
    out, lse = decode_attention_reference(
        q, paged.k_cache, paged.v_cache, paged.kv_lens, paged.block_tables, 0.3
    )
    for b, length in enumerate(KV_LENS):
        if length == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b])) and bool((lse[b] == float("-inf")).all())
            continue
        expected, expected_lse = naive_attention(
            q[b : b + 1], paged.keys[b], paged.values[b], torch.tensor([length]), 0.3
        )
        torch.testing.assert_close(out[b], expected[0].float(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[b], expected_lse[0].float(), atol=1e-5, rtol=1e-5)


def check_kernel(
    kv_lens: list[int],
    q_heads: int,
    k_heads: int,
    head_dim: int,
    block_size: int,
    num_splits: int | None,
    target: Target,
    config: DecodeTileConfig | None = None,
) -> None:
    paged = make_paged_kv(kv_lens, k_heads, head_dim, block_size, target)
    q = torch.randn(len(kv_lens), q_heads, head_dim, device=target.device).to(target.dtype)
    scale = head_dim**-0.5
    args = (paged.kv_lens, paged.block_tables, scale)
    out, lse = decode_attention_triton(q, paged.k_cache, paged.v_cache, *args, num_splits, config)
    # The reference runs in fp32 on the same (rounded) inputs: the tolerance covers the kernel's own rounding.
    expected, expected_lse = decode_attention_reference(
        q.float(), paged.k_cache.float(), paged.v_cache.float(), *args
    )
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), expected, atol=target.atol, rtol=target.rtol)
    torch.testing.assert_close(lse, expected_lse, atol=target.atol, rtol=target.rtol)  # -inf where empty


@pytest.mark.parametrize("num_splits", [None, 1, 3, 12])  # 12: more splits than tiles in some rows
@pytest.mark.parametrize(("q_heads", "k_heads"), GQA)
def test_kernel_matches_reference(target: Target, q_heads: int, k_heads: int, num_splits: int | None) -> None:
    check_kernel(KV_LENS, q_heads, k_heads, 32, 8, num_splits, target)


@pytest.mark.parametrize(("head_dim", "block_size"), [(64, 16), (128, 5)])
def test_kernel_head_dims(target: Target, head_dim: int, block_size: int) -> None:
    check_kernel([50, 23], 8, 2, head_dim, block_size, None, target)


def test_kernel_long_context_split(target: Target) -> None:
    check_kernel([700, 0, 333], 8, 2, 32, 16, 6, target)


@pytest.mark.parametrize("kv_len", [1024, 8192, 32768])
def test_kernel_real_shapes(gpu_target: Target, kv_len: int) -> None:
    # B=32 ragged around kv_len (one row full, one empty), 32 query / 8 KV heads, head dim 128.
    batch = 32 if kv_len <= 8192 else 4
    lengths = torch.randint(1, kv_len + 1, (batch,), generator=torch.Generator().manual_seed(kv_len)).tolist()
    lengths[0], lengths[1] = kv_len, 0
    check_kernel(lengths, 32, 8, 128, 16, None, gpu_target)


# Launch shapes other than the default, as bench/sweep_decode_attention.py tries them: key tiles spanning
# four pages, two, or lying inside one; the page table read a tile ahead (over splits left empty by rows of
# 0 and 1 keys too); a split count given outright next to the one programs_per_sm picks.
@pytest.mark.parametrize(
    ("config", "block_size", "num_splits"),
    [
        (DecodeTileConfig(32, 4, 2, programs_per_sm=2), 8, None),
        (DecodeTileConfig(16, 4, 3, programs_per_sm=8, table_ahead=True), 8, 5),
        (DecodeTileConfig(32, 8, 4, programs_per_sm=4, table_ahead=True), 64, None),
    ],
    ids=str,
)
def test_kernel_launch_configs(
    target: Target, config: DecodeTileConfig, block_size: int, num_splits: int | None
) -> None:
    check_kernel(KV_LENS, 8, 2, 32, block_size, num_splits, target, config)


# Sweep candidates whose compiled form differs most from the default's (sm_90: the table read ahead takes
# the pipeliner from one K/V tile in flight to num_stages - 1; 128-key tiles), at a real decode shape.
@pytest.mark.parametrize(
    "config",
    [
        DecodeTileConfig(64, 4, 4, programs_per_sm=2, table_ahead=True),
        DecodeTileConfig(128, 8, 3, programs_per_sm=4, table_ahead=True),
        DecodeTileConfig(32, 4, 5, programs_per_sm=8, table_ahead=True),
    ],
    ids=str,
)
def test_kernel_launch_configs_real_shape(gpu_target: Target, config: DecodeTileConfig) -> None:
    lengths = torch.randint(1, 4097, (32,), generator=torch.Generator().manual_seed(1)).tolist()
    lengths[0], lengths[1] = 4096, 0
    check_kernel(lengths, 32, 8, 128, 16, None, gpu_target, config)


@pytest.mark.parametrize("shape", [(8, 4, 1, 4), (48, 4, 1, 4), (16, 3, 1, 4), (16, 4, 0, 4), (16, 4, 1, 0)])
def test_launch_config_rejects_bad_shapes(shape: tuple[int, int, int, int]) -> None:
    with pytest.raises(AssertionError):
        DecodeTileConfig(*shape)


@pytest.mark.parametrize("head_dim", [64, 128, 24])  # 24: not a multiple of the 16-lane vectors
@pytest.mark.parametrize(("q_heads", "k_heads"), GQA)
@pytest.mark.parametrize("block_size", [1, 8, 16])
def test_native_cpu_kernel_matches_reference(
    q_heads: int, k_heads: int, head_dim: int, block_size: int
) -> None:
    kernel = native_function_or_skip()
    kv_lens = [*KV_LENS, 1000]  # a long row: the online softmax's running max moves many times
    paged = make_paged_kv(kv_lens, k_heads, head_dim, block_size, CPU_FP32)
    q = torch.randn(len(kv_lens), q_heads, head_dim) * 3  # sharper scores than unit-variance queries give
    args = (paged.kv_lens, paged.block_tables, head_dim**-0.5)
    out, lse = decode_attention_native(kernel, q, paged.k_cache, paged.v_cache, *args)
    expected, expected_lse = decode_attention_reference(q, paged.k_cache, paged.v_cache, *args)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, expected_lse, atol=1e-5, rtol=1e-5)  # -inf where empty


def test_cpu_dispatch_takes_the_native_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    native_function_or_skip()
    paged = make_paged_kv(KV_LENS, 2, 32, 8, CPU_FP32)
    q = torch.randn(len(KV_LENS), 6, 32)
    args = (q, paged.k_cache, paged.v_cache, paged.kv_lens, paged.block_tables, 0.3)
    calls: list[int] = []
    original = decode_attention_module.decode_attention_native

    def counting(*a: object) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(1)
        return original(*a)  # type: ignore[arg-type]

    monkeypatch.setattr(decode_attention_module, "decode_attention_native", counting)
    monkeypatch.delenv("DIPTYCH_KERNELS", raising=False)
    decode_attention_module.decode_attention(*args)
    assert calls == [1]
    monkeypatch.setenv("DIPTYCH_NATIVE_KERNELS", "0")
    out, _ = decode_attention_module.decode_attention(*args)  # the reference, switched by the variable
    assert calls == [1]
    torch.testing.assert_close(out, decode_attention_reference(*args)[0])


def native_function_or_skip() -> Callable[..., None]:
    kernel = decode_attention_module._NATIVE()
    if kernel is None:
        pytest.skip("no C compiler on this host")
    return kernel
