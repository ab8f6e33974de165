"""Test targets, paged-KV factories and naive dense attention for the kernel tests."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch


@dataclass(frozen=True)
class Target:
    """Where a kernel test runs, and the tolerance its dtype earns against the reference."""

    device: str
    dtype: torch.dtype
    atol: float
    rtol: float


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_CPU_MARKS = [pytest.mark.skipif(not INTERPRETED, reason="Triton on CPU tensors needs TRITON_INTERPRET=1")]
_GPU_MARKS = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
# bf16 tl.dot is wrong in the interpreter, so the CPU runs are fp32 only; half precision runs on CUDA.
_BF16 = Target("cuda", torch.bfloat16, atol=2e-2, rtol=2e-2)
_FP16 = Target("cuda", torch.float16, atol=1e-2, rtol=1e-2)
GPU_TARGETS = [
    pytest.param(_BF16, id="cuda-bf16", marks=_GPU_MARKS),
    pytest.param(_FP16, id="cuda-fp16", marks=_GPU_MARKS),
]
TARGETS = [
    pytest.param(Target("cpu", torch.float32, atol=1e-5, rtol=1e-5), id="cpu-fp32", marks=_CPU_MARKS),
    *GPU_TARGETS,
]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class PagedKV:
    """Random K/V of several sequences, both dense (per sequence) and scattered into a paged cache."""

    keys: list[torch.Tensor]  # [L_b, Hk, D] each
    values: list[torch.Tensor]
    k_cache: torch.Tensor  # [num_blocks, block_size, Hk, D]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with -1
    kv_lens: torch.Tensor  # [B] int32


def make_paged_kv(
    kv_lens: list[int], num_kv_heads: int, head_dim: int, block_size: int, target: Target, seed: int = 0
) -> PagedKV:
    gen = torch.Generator().manual_seed(seed)
    keys = [torch.randn(n, num_kv_heads, head_dim, generator=gen).to(target.dtype) for n in kv_lens]
    values = [torch.randn(n, num_kv_heads, head_dim, generator=gen).to(target.dtype) for n in kv_lens]
    return paged_from_dense(keys, values, block_size, target, seed)


def paged_from_dense(
    keys: list[torch.Tensor], values: list[torch.Tensor], block_size: int, target: Target, seed: int = 0
) -> PagedKV:
    """Scatters per-sequence K/V [L_b, Hk, D] into a paged cache under shuffled, non-contiguous block ids.

    Every cache slot no sequence owns holds NaN, so a kernel that reads past a sequence's length (or an
    unused block) poisons its output.
    """
    kv_lens = [k.shape[0] for k in keys]
    blocks_needed = [cdiv(n, block_size) for n in kv_lens]
    num_blocks = sum(blocks_needed) + 3  # spare blocks that no table references
    block_ids = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))
    shape = (num_blocks, block_size, *keys[0].shape[1:])
    caches = [torch.full(shape, float("nan"), dtype=target.dtype, device=target.device) for _ in range(2)]
    # One spare padding column so that no table row is exactly full.
    tables = torch.full((len(kv_lens), max(blocks_needed, default=0) + 1), -1, dtype=torch.int32)
    used = 0
    for b, count in enumerate(blocks_needed):
        ids = block_ids[used : used + count]
        used += count
        tables[b, :count] = ids.to(torch.int32)
        for cache, dense in zip(caches, (keys[b], values[b]), strict=True):
            padded = torch.full((count * block_size, *shape[2:]), float("nan"), dtype=target.dtype)
            padded[: kv_lens[b]] = dense.cpu()
            cache[ids.to(target.device)] = padded.view(count, *shape[1:]).to(target.device)
    return PagedKV(
        keys=[k.to(target.device) for k in keys],
        values=[v.to(target.device) for v in values],
        k_cache=caches[0],
        v_cache=caches[1],
        block_tables=tables.to(target.device),
        kv_lens=torch.tensor(kv_lens, dtype=torch.int32, device=target.device),
    )


def naive_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense softmax attention in fp64 on unpaged K/V: q [M, Hq, D] at positions [M] sees keys j <= position.

    Returns (out [M, Hq, D] fp64, lse [M, Hq] fp64); every query must see at least one key.
    """
    group = q.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1)
    v = values.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("mhd,nhd->hmn", q.double(), k) * scale
    visible = torch.arange(keys.shape[0], device=q.device)[None, :] <= positions[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    out = torch.einsum("hmn,nhd->mhd", torch.softmax(scores, dim=-1), v)
    return out, torch.logsumexp(scores, dim=-1).transpose(0, 1)
