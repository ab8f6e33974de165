"""Paged causal attention for a variable-length batch of query chunks over each sequence's cached KV.

Sequence b owns query rows cu_seqlens_q[b]:cu_seqlens_q[b+1]; its K/V, this chunk's included, are already in
the paged cache (kv_lens[b] tokens, addressed by block_tables[b]). Query row i sits at position
kv_len - q_len + i and sees every cached position up to its own: the cached prefix and the causal chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.dispatch import use_triton

LOG2_E = 1.4426950408889634  # 1/ln 2: the kernels use exp2, so log2(e) is folded into the softmax scale


@triton.jit
def _find_sequence(cu_seqlens_q_ptr, num_seqs, tile, BLOCK_M: tl.constexpr):
    """Binary search for the sequence owning query tile `tile`.

    Sequence b's tiles start at cu_seqlens_q[b] // BLOCK_M + b: strictly increasing, and far enough apart
    for its cdiv(q_len, BLOCK_M) tiles. So T // BLOCK_M + B programs cover every sequence with no host sync.
    """
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(cu_seqlens_q_ptr + mid) // BLOCK_M + mid <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend_tiles(
    acc,
    m_i,
    l_i,
    q,
    k_cache_ptr,
    v_cache_ptr,
    table_ptr,
    head_offset,
    stride_cache_block,
    stride_cache_slot,
    block_size,
    kv_len,
    positions,
    qk_scale,
    start,
    end,
    MASKED: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online-softmax accumulation (base 2) over keys [start, end); MASKED applies the causal/length mask."""
    offs_d = tl.arange(0, HEAD_DIM)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_range = offs_n < kv_len
        if MASKED:
            blocks = tl.load(table_ptr + offs_n // block_size, mask=in_range, other=0)
        else:
            blocks = tl.load(table_ptr + offs_n // block_size)
        rows = (
            blocks.to(tl.int64) * stride_cache_block + (offs_n % block_size) * stride_cache_slot + head_offset
        )
        kv_offsets = rows[:, None] + offs_d[None, :]
        if MASKED:
            k = tl.load(k_cache_ptr + kv_offsets, mask=in_range[:, None], other=0.0)
            v = tl.load(v_cache_ptr + kv_offsets, mask=in_range[:, None], other=0.0)
        else:
            k = tl.load(k_cache_ptr + kv_offsets)
            v = tl.load(v_cache_ptr + kv_offsets)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            visible = (offs_n[None, :] <= positions[:, None]) & in_range[None, :]
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _prefill_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    cu_seqlens_q_ptr,
    kv_lens_ptr,
    block_tables_ptr,
    stride_q_token,
    stride_q_head,
    stride_out_token,
    stride_out_head,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    stride_table_seq,
    num_seqs,
    block_size,
    qk_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    seq = _find_sequence(cu_seqlens_q_ptr, num_seqs, tile, BLOCK_M)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    m0 = (tile - (q_start // BLOCK_M + seq)) * BLOCK_M
    if m0 >= q_len:  # spare program past this sequence's last tile
        return
    kv_len = tl.load(kv_lens_ptr + seq)
    prefix = kv_len - q_len
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_offsets = (
        (q_start + offs_m).to(tl.int64)[:, None] * stride_q_token + head * stride_q_head + offs_d[None, :]
    )
    q = tl.load(q_ptr + q_offsets, mask=offs_m[:, None] < q_len, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    table_ptr = block_tables_ptr + seq * stride_table_seq
    head_offset = (head // GROUP) * stride_cache_head
    positions = prefix + offs_m
    # Key tiles wholly at or before the tile's first query position are visible to all its rows: no mask.
    # The rest, up to its last query position, are masked; tiles past that are skipped.
    unmasked_end = (prefix + m0 + 1) // BLOCK_N * BLOCK_N
    causal_end = tl.minimum(kv_len, prefix + m0 + BLOCK_M)
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, table_ptr, head_offset, stride_cache_block,
        stride_cache_slot, block_size, kv_len, positions, qk_scale, 0, unmasked_end,
        False, HEAD_DIM, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, table_ptr, head_offset, stride_cache_block,
        stride_cache_slot, block_size, kv_len, positions, qk_scale, unmasked_end, causal_end,
        True, HEAD_DIM, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip
    out = acc / l_i[:, None]
    out_offsets = (q_start + offs_m).to(tl.int64)[:, None] * stride_out_token + head * stride_out_head
    tl.store(
        out_ptr + out_offsets + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=offs_m[:, None] < q_len,
    )


def _tile_config(q: torch.Tensor) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    if not q.is_cuda:
        return 16, 16, 4, 1  # interpreter: the smallest tl.dot tiles keep test shapes small
    if q.shape[2] <= 64:
        return 128, 64, 4, 3
    return 128, 64, 8, 3  # head dim 128, bf16: 32 KB of q + 3 stages x 32 KB of K/V in Hopper's 228 KB smem


def prefill_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    kv_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    num_tokens, num_q_heads, head_dim = q.shape
    num_seqs = kv_lens.shape[0]
    assert q.stride(2) == 1 and q.dtype == k_cache.dtype == v_cache.dtype
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
    assert k_cache.shape[3] == head_dim and num_q_heads % k_cache.shape[2] == 0
    assert head_dim in (16, 32, 64, 128, 256), "head dim must be a power of 2 in 16..256"
    assert cu_seqlens_q.shape == (num_seqs + 1,) and cu_seqlens_q.dtype == kv_lens.dtype == torch.int32
    assert block_tables.dim() == 2 and block_tables.shape[0] == num_seqs and block_tables.stride(1) == 1
    assert block_tables.dtype == torch.int32
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return out
    block_m, block_n, num_warps, num_stages = _tile_config(q)
    _prefill_attention_kernel[(num_tokens // block_m + num_seqs, num_q_heads)](
        q,
        k_cache,
        v_cache,
        out,
        cu_seqlens_q,
        kv_lens,
        block_tables,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        num_seqs,
        k_cache.shape[1],
        scale * LOG2_E,
        GROUP=num_q_heads // k_cache.shape[2],
        HEAD_DIM=head_dim,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 stays exact, not tf32
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


def _gather(cache: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """[length, Hk, D]: the first `length` cached tokens of one sequence, blocks in table order."""
    num_blocks = -(-length // cache.shape[1])
    return cache[table[:num_blocks].long()].flatten(0, 1)[:length]


def prefill_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    kv_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    group = q.shape[1] // k_cache.shape[2]
    out = torch.empty_like(q)
    bounds, lens = cu_seqlens_q.tolist(), kv_lens.tolist()
    for b, kv_len in enumerate(lens):
        start, end = bounds[b], bounds[b + 1]
        if start == end:
            continue
        # [H, L, D] layout for SDPA; GQA by repeating each KV head for its query group.
        k = _gather(k_cache, block_tables[b], kv_len).transpose(0, 1).repeat_interleave(group, dim=0)
        v = _gather(v_cache, block_tables[b], kv_len).transpose(0, 1).repeat_interleave(group, dim=0)
        # Row i may see key j iff j <= (kv_len - q_len) + i: a causal mask shifted by the cached prefix.
        mask = torch.ones(end - start, kv_len, dtype=torch.bool, device=q.device).tril(kv_len - (end - start))
        o = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1), k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale
        )
        out[start:end] = o.transpose(0, 1)
    return out


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    kv_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q [T, Hq, D], caches [num_blocks, block_size, Hk, D] -> [T, Hq, D] in q.dtype (GQA: Hq % Hk == 0)."""
    if use_triton(q):
        return prefill_attention_triton(q, k_cache, v_cache, cu_seqlens_q, kv_lens, block_tables, scale)
    return prefill_attention_reference(q, k_cache, v_cache, cu_seqlens_q, kv_lens, block_tables, scale)
