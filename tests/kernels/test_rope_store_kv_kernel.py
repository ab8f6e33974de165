"""RoPE + KV-cache write in one kernel: the same q, k and caches as apply_rope then store_kv_cache."""

from __future__ import annotations

import pytest
import torch

from diptych.kernels.kv_cache_write import store_kv_cache_reference
from diptych.kernels.rope import apply_rope_reference
from diptych.kernels.rope_store_kv import rope_and_store_kv_triton
from tests.kernels.helpers import Target
from tests.kernels.test_rope_kernel import MAX_POSITIONS, cos_sin_cache, hf_rotary


def check_kernel(
    tokens: int, q_heads: int, kv_heads: int, head_dim: int, num_blocks: int, block_size: int, target: Target
) -> None:
    table = cos_sin_cache(hf_rotary(head_dim), target.device)
    positions = torch.randint(0, MAX_POSITIONS, (tokens,), device=target.device)
    slots = torch.randperm(num_blocks * block_size, device=target.device)[:tokens]
    slots[::5] = -1  # padding tokens
    width = (q_heads + 2 * kv_heads) * head_dim
    qkv = torch.randn(tokens, width, device=target.device).to(target.dtype)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    results = []
    for fused in (True, False):
        buffer = qkv.clone()
        q = buffer[:, : q_heads * head_dim].view(tokens, q_heads, head_dim)  # strided views of one buffer
        k = buffer[:, q_heads * head_dim : (q_heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
        v = buffer[:, (q_heads + kv_heads) * head_dim :].view(tokens, kv_heads, head_dim)
        k_cache = torch.full(shape, float("nan"), dtype=target.dtype, device=target.device)
        v_cache = torch.full(shape, float("nan"), dtype=target.dtype, device=target.device)
        if fused:
            rope_and_store_kv_triton(q, k, v, positions, table, k_cache, v_cache, slots)
        else:
            apply_rope_reference(q, k, positions, table)
            store_kv_cache_reference(k, v, k_cache, v_cache, slots)
        results.append((buffer, k_cache, v_cache))
    (buffer, k_cache, v_cache), (expected_buffer, expected_k, expected_v) = results
    # q and k rotated in place as the reference does, v left as it was.
    torch.testing.assert_close(buffer, expected_buffer, atol=target.atol, rtol=target.rtol)
    # Only the mapped slots written (the rest stay NaN), with the rotated k and the untouched v.
    torch.testing.assert_close(k_cache, expected_k, atol=target.atol, rtol=target.rtol, equal_nan=True)
    torch.testing.assert_close(v_cache, expected_v, rtol=0, atol=0, equal_nan=True)
    written = (slots >= 0).sum().item()
    assert (~k_cache.isnan()).all(dim=(2, 3)).sum().item() == written
    assert written < tokens


@pytest.mark.parametrize(
    ("q_heads", "kv_heads", "head_dim"), [(4, 4, 16), (9, 3, 64), (8, 1, 32), (4, 3, 24)]
)
def test_kernel_matches_rope_then_store(target: Target, q_heads: int, kv_heads: int, head_dim: int) -> None:
    check_kernel(11, q_heads, kv_heads, head_dim, num_blocks=7, block_size=4, target=target)


def test_kernel_real_shapes(gpu_target: Target) -> None:
    check_kernel(512, 32, 8, 128, num_blocks=256, block_size=16, target=gpu_target)
