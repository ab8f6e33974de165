"""Paged decode attention: one query token per sequence over its cached KV, returning the LSE too.

The LSE (natural log of the softmax denominator of the scaled scores) lets partial results over disjoint
KV shards be merged exactly (kernels/merge_attn_states.py); a sequence with no cached tokens gets out = 0
and lse = -inf, so an empty shard merges as nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.dispatch import use_triton

LOG2_E = 1.4426950408889634  # 1/ln 2: the kernels use exp2, so log2(e) is folded into the softmax scale
LN_2 = tl.constexpr(0.6931471805599453)  # ln 2: converts the base-2 LSE back to natural log (read in-kernel)
MIN_DOT_ROWS = 16  # tl.dot needs at least 16 rows: a query group is padded up to it


@triton.jit
def _decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    kv_lens_ptr,
    block_tables_ptr,
    partial_out_ptr,
    partial_lse_ptr,
    stride_q_seq,
    stride_q_head,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    stride_table_seq,
    block_size,
    qk_scale,
    GROUP: tl.constexpr,
    NUM_Q_HEADS: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One (sequence, KV head, split): the whole query group of that KV head against one slice of its keys.

    Writes the split's normalised output and its base-2 LSE (-inf and zeros for an empty slice).
    """
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    kv_len = tl.load(kv_lens_ptr + seq)
    # Slices are whole BLOCK_N tiles: no tile straddles two splits.
    split_len = tl.cdiv(tl.cdiv(kv_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, kv_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + offs_g
    q_offsets = seq * stride_q_seq + heads[:, None] * stride_q_head + offs_d[None, :]
    q = tl.load(q_ptr + q_offsets, mask=offs_g[:, None] < GROUP, other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    table_ptr = block_tables_ptr + seq * stride_table_seq
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_range = offs_n < end
        blocks = tl.load(table_ptr + offs_n // block_size, mask=in_range, other=0)
        rows = blocks.to(tl.int64) * stride_cache_block + (offs_n % block_size) * stride_cache_slot
        kv_offsets = (rows + kv_head * stride_cache_head)[:, None] + offs_d[None, :]
        k = tl.load(k_cache_ptr + kv_offsets, mask=in_range[:, None], other=0.0)
        v = tl.load(v_cache_ptr + kv_offsets, mask=in_range[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        qk = tl.where(in_range[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    partial_rows = (seq * NUM_Q_HEADS + heads) * NUM_SPLITS + split  # partials are [B, Hq, NUM_SPLITS, (D)]
    group_mask = offs_g < GROUP
    tl.store(partial_lse_ptr + partial_rows, lse, mask=group_mask)
    tl.store(
        partial_out_ptr + partial_rows[:, None] * HEAD_DIM + offs_d[None, :], out, mask=group_mask[:, None]
    )


@triton.jit
def _decode_merge_kernel(
    partial_out_ptr,
    partial_lse_ptr,
    out_ptr,
    lse_ptr,
    stride_out_seq,
    stride_out_head,
    NUM_Q_HEADS: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
):
    """Second stage: merges the NUM_SPLITS partials of one (sequence, query head) by their LSEs."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    row = seq * NUM_Q_HEADS + head
    offs_s = tl.arange(0, BLOCK_SPLITS)
    offs_d = tl.arange(0, HEAD_DIM)
    lse = tl.load(partial_lse_ptr + row * NUM_SPLITS + offs_s, mask=offs_s < NUM_SPLITS, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # every split empty: weights 0, not NaN
    weights = tl.exp2(lse - lse_max)
    total = tl.sum(weights, axis=0)
    partial_offsets = (row * NUM_SPLITS + offs_s)[:, None] * HEAD_DIM + offs_d[None, :]
    partials = tl.load(partial_out_ptr + partial_offsets, mask=(offs_s < NUM_SPLITS)[:, None], other=0.0)
    empty = total == 0.0
    safe_total = tl.where(empty, 1.0, total)
    out = tl.sum(partials * weights[:, None], axis=0) / safe_total
    tl.store(
        out_ptr + seq * stride_out_seq + head * stride_out_head + offs_d, out.to(out_ptr.dtype.element_ty)
    )
    tl.store(lse_ptr + row, tl.where(empty, float("-inf"), (lse_max + tl.log2(safe_total)) * LN_2))


def _tile_config(q: torch.Tensor) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages)."""
    if not q.is_cuda:
        return 16, 4, 1  # interpreter: small tiles so that test contexts span many of them
    return (64, 4, 3) if q.shape[2] >= 128 else (128, 4, 3)


def default_num_splits(batch: int, num_kv_heads: int, max_tokens: int, device: torch.device) -> int:
    """Enough splits for about four programs per SM, each still reading at least 256 keys.

    max_tokens is the block-table capacity, known on the host without a sync (and fixed under CUDA graphs).
    """
    if device.type != "cuda":
        return max(1, min(8, max_tokens // 64))  # interpreter: exercise the split path at test sizes
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    wanted = triton.cdiv(4 * num_sms, max(1, batch * num_kv_heads))
    return max(1, min(wanted, max_tokens // 256, 64))  # 64: keeps the merge stage's split axis small


def decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert q.stride(2) == 1 and q.dtype == k_cache.dtype == v_cache.dtype
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
    assert k_cache.shape[3] == head_dim and num_q_heads % num_kv_heads == 0
    assert head_dim in (16, 32, 64, 128, 256), "head dim must be a power of 2 in 16..256"
    assert kv_lens.shape == (batch,) and kv_lens.dtype == block_tables.dtype == torch.int32
    assert block_tables.dim() == 2 and block_tables.shape[0] == batch and block_tables.stride(1) == 1
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, num_q_heads), dtype=torch.float32, device=q.device)
    if batch == 0:
        return out, lse
    if num_splits is None:
        num_splits = default_num_splits(batch, num_kv_heads, block_tables.shape[1] * block_size, q.device)
    group = num_q_heads // num_kv_heads
    partial_out = torch.empty(
        (batch, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=q.device
    )
    partial_lse = torch.empty((batch, num_q_heads, num_splits), dtype=torch.float32, device=q.device)
    block_n, num_warps, num_stages = _tile_config(q)
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        kv_lens,
        block_tables,
        partial_out,
        partial_lse,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        block_size,
        scale * LOG2_E,
        GROUP=group,
        NUM_Q_HEADS=num_q_heads,
        NUM_SPLITS=num_splits,
        HEAD_DIM=head_dim,
        BLOCK_G=max(MIN_DOT_ROWS, triton.next_power_of_2(group)),
        BLOCK_N=block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 stays exact, not tf32
        num_warps=num_warps,
        num_stages=num_stages,
    )
    _decode_merge_kernel[(batch, num_q_heads)](
        partial_out,
        partial_lse,
        out,
        lse,
        out.stride(0),
        out.stride(1),
        NUM_Q_HEADS=num_q_heads,
        NUM_SPLITS=num_splits,
        HEAD_DIM=head_dim,
        BLOCK_SPLITS=triton.next_power_of_2(num_splits),
    )
    return out, lse


def decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    # num_splits only tunes the Triton kernel's parallelism; the unsplit result is the same.
    batch, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    max_len = int(kv_lens.max()) if batch else 0
    num_blocks = -(-max_len // block_size)
    positions = torch.arange(num_blocks * block_size, device=q.device)
    valid = positions[None, :] < kv_lens[:, None].long()  # [B, L]
    # Table entries past a row's length may be padding: point them at block 0 (they are masked out).
    block_valid = valid[:, ::block_size] if num_blocks else valid[:, :0]
    tables = torch.where(block_valid, block_tables[:, :num_blocks].long(), 0)
    k = k_cache[tables].flatten(1, 2).float()  # [B, L, Hk, D]
    # Zero the values past each length: stale cache slots may hold NaN/inf, and 0 * NaN would leak.
    v = v_cache[tables].flatten(1, 2).float().masked_fill(~valid[:, :, None, None], 0.0)
    q_groups = q.float().view(batch, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
    scores = torch.einsum("bhgd,blhd->bhgl", q_groups, k) * scale
    scores.masked_fill_(~valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hk, g]; -inf for an empty row
    probs = torch.exp(scores - lse.masked_fill(lse == float("-inf"), 0.0).unsqueeze(-1))
    out = torch.einsum("bhgl,blhd->bhgd", probs, v)
    return out.reshape(q.shape).to(q.dtype), lse.reshape(batch, num_q_heads)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hq, D] -> (out [B, Hq, D] in q.dtype, lse [B, Hq] fp32); kv_lens [B] int32 may hold zeros."""
    if use_triton(q):
        return decode_attention_triton(q, k_cache, v_cache, kv_lens, block_tables, scale, num_splits)
    return decode_attention_reference(q, k_cache, v_cache, kv_lens, block_tables, scale, num_splits)
