"""Paged prefill attention: reference vs dense causal attention, Triton kernel vs reference, LSE included."""

from __future__ import annotations

import itertools

import pytest
import torch

from diptych.kernels.prefill_attention import (
    TileConfig,
    prefill_attention_reference,
    prefill_attention_triton,
)
from tests.kernels.helpers import PagedKV, Target, make_paged_kv, naive_attention, paged_from_dense

pytestmark = pytest.mark.usefixtures("poison_empty")
CPU_FP32 = Target("cpu", torch.float32, atol=1e-5, rtol=1e-5)
GQA = [(4, 4), (6, 2), (8, 2), (8, 1)]  # query/KV head ratios 1, 3, 4, 8
# (query chunk lengths, cached prefix lengths) per sequence; with block size 8 the prefixes end mid-block,
# and the chunks cross the interpreter's 16-row tiles. A sequence may have an empty chunk.
BATCHES = {
    "ragged-no-prefix": ([20, 7, 33], [0, 0, 0]),
    "chunks-after-prefix": ([9, 16, 1, 0, 18], [13, 35, 50, 5, 3]),
}


def make_batch(
    q_lens: list[int],
    prefixes: list[int],
    q_heads: int,
    k_heads: int,
    head_dim: int,
    block_size: int,
    target: Target,
) -> tuple[torch.Tensor, torch.Tensor, PagedKV]:
    paged = make_paged_kv(
        [q + p for q, p in zip(q_lens, prefixes, strict=True)], k_heads, head_dim, block_size, target
    )
    cu_seqlens_q = torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32, device=target.device)
    q = torch.randn(sum(q_lens), q_heads, head_dim, device=target.device).to(target.dtype)
    return q, cu_seqlens_q, paged


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize(("q_heads", "k_heads"), GQA)
def test_reference_matches_dense_attention(batch: str, q_heads: int, k_heads: int) -> None:
    q_lens, prefixes = BATCHES[batch]
    q, cu, paged = make_batch(q_lens, prefixes, q_heads, k_heads, 32, 8, CPU_FP32)
    out = prefill_attention_reference(
        q, paged.k_cache, paged.v_cache, cu, paged.kv_lens, paged.block_tables, 0.2
    )
    for b, (q_len, prefix) in enumerate(zip(q_lens, prefixes, strict=True)):
        rows = slice(int(cu[b]), int(cu[b + 1]))
        positions = prefix + torch.arange(q_len)
        expected, _ = naive_attention(q[rows], paged.keys[b], paged.values[b], positions, 0.2)
        torch.testing.assert_close(out[rows], expected.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize(("q_heads", "k_heads"), [(4, 4), (6, 2)])
def test_reference_lse_matches_dense_attention(batch: str, q_heads: int, k_heads: int) -> None:
    q_lens, prefixes = BATCHES[batch]
    q, cu, paged = make_batch(q_lens, prefixes, q_heads, k_heads, 32, 8, CPU_FP32)
    args = (q, paged.k_cache, paged.v_cache, cu, paged.kv_lens, paged.block_tables, 0.2)
    out, lse = prefill_attention_reference(*args, return_lse=True)
    assert lse.shape == (sum(q_lens), q_heads) and lse.dtype == torch.float32
    torch.testing.assert_close(out, prefill_attention_reference(*args), atol=0, rtol=0)
    for b, (q_len, prefix) in enumerate(zip(q_lens, prefixes, strict=True)):
        rows = slice(int(cu[b]), int(cu[b + 1]))
        positions = prefix + torch.arange(q_len)
        _, expected = naive_attention(q[rows], paged.keys[b], paged.values[b], positions, 0.2)
        torch.testing.assert_close(lse[rows], expected.float(), atol=1e-5, rtol=1e-5)


def check_kernel(
    q_lens: list[int],
    prefixes: list[int],
    q_heads: int,
    k_heads: int,
    head_dim: int,
    block_size: int,
    target: Target,
    config: TileConfig | None = None,
) -> None:
    q, cu, paged = make_batch(q_lens, prefixes, q_heads, k_heads, head_dim, block_size, target)
    scale = head_dim**-0.5
    out = prefill_attention_triton(
        q, paged.k_cache, paged.v_cache, cu, paged.kv_lens, paged.block_tables, scale, config
    )
    # The reference runs in fp32 on the same (rounded) inputs: the tolerance covers the kernel's own rounding.
    expected = prefill_attention_reference(
        q.float(), paged.k_cache.float(), paged.v_cache.float(), cu, paged.kv_lens, paged.block_tables, scale
    )
    assert out.dtype == q.dtype
    torch.testing.assert_close(out.float(), expected, atol=target.atol, rtol=target.rtol)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize(("q_heads", "k_heads"), GQA)
def test_kernel_matches_reference(target: Target, batch: str, q_heads: int, k_heads: int) -> None:
    check_kernel(*BATCHES[batch], q_heads, k_heads, 32, 8, target)


# Block 16 is one page per interpreter key tile, 32 puts two tiles in a page (one starts mid-page).
@pytest.mark.parametrize(("head_dim", "block_size"), [(64, 16), (128, 32)])
def test_kernel_head_dims(target: Target, head_dim: int, block_size: int) -> None:
    check_kernel([17, 30], [21, 0], 6, 2, head_dim, block_size, target)


# Tile shapes other than the default, as the GPU sweep tries them: key tiles spanning several pages (4 per
# tile), tiles inside one page, query tiles taller and shorter than key tiles.
@pytest.mark.parametrize(
    ("config", "block_size"),
    [
        (TileConfig(32, 16, 4, 1), 4),
        (TileConfig(16, 32, 4, 1), 8),
        (TileConfig(32, 32, 4, 1), 64),
        (TileConfig(64, 16, 4, 2), 32),
    ],
    ids=str,
)
def test_kernel_tile_configs(target: Target, config: TileConfig, block_size: int) -> None:
    check_kernel(*BATCHES["chunks-after-prefix"], 6, 2, 32, block_size, target, config)


# The structural variants the sweep compares, alone and together, over the batch with cached prefixes and
# an empty chunk: 16-key tiles give several unmasked and masked tiles per query tile, blocks of 8 put two
# pages in a key tile. Paired programs run over an odd tile
# count (the middle tile alone) and spare tiles; lazy rescaling meets rows whose max grows in later tiles.
VARIANTS = [
    TileConfig(16, 16, 4, 1, lazy_rescale=True),
    TileConfig(16, 16, 4, 1, paired=True),
    TileConfig(32, 16, 4, 2, lazy_rescale=True, paired=True, max_registers=128),
]


@pytest.mark.parametrize("config", VARIANTS, ids=str)
def test_kernel_variants(target: Target, config: TileConfig) -> None:
    check_kernel(*BATCHES["chunks-after-prefix"], 6, 2, 32, 8, target, config)


def test_lazy_rescale_with_growing_scores() -> None:
    # Scores that grow by 3 per key (over 60 in log2 units per 16-key tile) make every tile rescale, and a
    # tile's first keys weigh next to nothing: the exact answer needs every rescale taken.
    keys = torch.randn(90, 1, 16)
    keys[:, :, 0] += 3.0 * torch.arange(90)[:, None]
    paged = paged_from_dense([keys], [torch.randn(90, 1, 16)], 8, CPU_FP32)
    q = torch.randn(40, 2, 16)
    q[:, :, 0] = 1.0
    cu = torch.tensor([0, 40], dtype=torch.int32)
    args = (q, paged.k_cache, paged.v_cache, cu, paged.kv_lens, paged.block_tables, 1.0)
    out = prefill_attention_triton(*args, TileConfig(16, 16, 4, 1, lazy_rescale=True))
    torch.testing.assert_close(out, prefill_attention_reference(*args), atol=1e-5, rtol=1e-5)


def check_kernel_lse(
    q_lens: list[int],
    prefixes: list[int],
    q_heads: int,
    k_heads: int,
    head_dim: int,
    block_size: int,
    target: Target,
    config: TileConfig | None = None,
) -> None:
    """The kernel's LSE against the reference's, and its output the same as without the LSE."""
    q, cu, paged = make_batch(q_lens, prefixes, q_heads, k_heads, head_dim, block_size, target)
    scale = head_dim**-0.5
    args = (q, paged.k_cache, paged.v_cache, cu, paged.kv_lens, paged.block_tables, scale)
    out, lse = prefill_attention_triton(*args, config, return_lse=True)
    tables = (cu, paged.kv_lens, paged.block_tables, scale)
    _, expected = prefill_attention_reference(
        q.float(), paged.k_cache.float(), paged.v_cache.float(), *tables, return_lse=True
    )
    assert lse.shape == (sum(q_lens), q_heads) and lse.dtype == torch.float32
    torch.testing.assert_close(out, prefill_attention_triton(*args, config), atol=0, rtol=0)
    torch.testing.assert_close(lse, expected, atol=target.atol, rtol=target.rtol)


@pytest.mark.parametrize("config", [None, *VARIANTS], ids=str)
def test_kernel_lse_matches_reference(target: Target, config: TileConfig | None) -> None:
    check_kernel_lse(*BATCHES["chunks-after-prefix"], 6, 2, 32, 8, target, config)


def test_lazy_rescale_lse_with_growing_scores() -> None:
    # As above: with lazy rescaling the LSE's offset is the max its p were taken against, not the row max.
    keys = torch.randn(90, 1, 16)
    keys[:, :, 0] += 3.0 * torch.arange(90)[:, None]
    paged = paged_from_dense([keys], [torch.randn(90, 1, 16)], 8, CPU_FP32)
    q = torch.randn(40, 2, 16)
    q[:, :, 0] = 1.0
    cu = torch.tensor([0, 40], dtype=torch.int32)
    args = (q, paged.k_cache, paged.v_cache, cu, paged.kv_lens, paged.block_tables, 1.0)
    _, lse = prefill_attention_triton(*args, TileConfig(16, 16, 4, 1, lazy_rescale=True), return_lse=True)
    _, expected = prefill_attention_reference(*args, return_lse=True)
    torch.testing.assert_close(lse, expected, atol=1e-5, rtol=1e-5)


def test_kernel_rejects_block_size_not_a_power_of_two() -> None:
    q, cu, paged = make_batch([5], [3], 2, 1, 16, 6, CPU_FP32)
    with pytest.raises(AssertionError, match="power of 2"):
        prefill_attention_triton(q, paged.k_cache, paged.v_cache, cu, paged.kv_lens, paged.block_tables, 0.25)


@pytest.mark.parametrize("shape", [(48, 16, 4, 1), (16, 8, 4, 1), (64, 64, 3, 1), (64, 64, 4, 0)])
def test_tile_config_rejects_bad_shapes(shape: tuple[int, int, int, int]) -> None:
    with pytest.raises(AssertionError):
        TileConfig(*shape)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_kernel_real_shapes(gpu_target: Target, head_dim: int) -> None:
    # L=4096: one whole prompt, and a 1024-token chunk after a 3072-token cached prefix.
    check_kernel([4096, 1024], [0, 3072], 32, 8, head_dim, 16, gpu_target)


def test_kernel_lse_real_shapes(gpu_target: Target) -> None:
    # The default (paired) tiles with the LSE: a whole prompt and a chunk after a cached prefix.
    check_kernel_lse([1024, 512], [0, 1536], 32, 8, 128, 16, gpu_target)
