"""KV-cache write by slot mapping: exact, skips negative slots, leaves every other slot untouched."""

from __future__ import annotations

import torch

from diptych.kernels.kv_cache_write import store_kv_cache_reference, store_kv_cache_triton
from tests.kernels.helpers import Target


def check_store(
    tokens: int, heads: int, head_dim: int, num_blocks: int, block_size: int, target: Target
) -> None:
    fused = torch.randn(tokens, 3 * heads * head_dim, device=target.device).to(target.dtype)
    k = fused[:, heads * head_dim : 2 * heads * head_dim].view(tokens, heads, head_dim)  # strided views
    v = fused[:, 2 * heads * head_dim :].view(tokens, heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, device=target.device)[:tokens]
    slots[::5] = -1  # padding tokens
    shape = (num_blocks, block_size, heads, head_dim)
    results = []
    for store in (store_kv_cache_triton, store_kv_cache_reference):
        k_cache = torch.full(shape, float("nan"), dtype=target.dtype, device=target.device)
        v_cache = torch.full(shape, float("nan"), dtype=target.dtype, device=target.device)
        store(k, v, k_cache, v_cache, slots)
        results.append((k_cache, v_cache))
    for k_cache, v_cache in results:
        for cache, source in ((k_cache, k), (v_cache, v)):
            flat = cache.view(-1, heads, head_dim)
            written = torch.zeros(flat.shape[0], dtype=torch.bool, device=target.device)
            for token, slot in enumerate(slots.tolist()):
                if slot >= 0:
                    written[slot] = True
                    assert torch.equal(flat[slot], source[token])
            assert flat[~written].isnan().all()
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0, equal_nan=True)


def test_kernel_matches_reference(target: Target) -> None:
    check_store(tokens=23, heads=3, head_dim=64, num_blocks=9, block_size=4, target=target)


def test_kernel_real_shapes(gpu_target: Target) -> None:
    check_store(tokens=512, heads=8, head_dim=128, num_blocks=256, block_size=16, target=gpu_target)
