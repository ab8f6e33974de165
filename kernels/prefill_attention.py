"""Paged causal attention for a variable-length batch of query chunks over each sequence's cached KV.

Sequence b owns query rows cu_seqlens_q[b]:cu_seqlens_q[b+1]; its K/V, this chunk's included, are already in
the paged cache (kv_lens[b] tokens, addressed by block_tables[b]). Query row i sits at position
kv_len - q_len + i and sees every cached position up to its own: the cached prefix and the causal chunk.

Asked to (return_lse), it also returns each row's LSE, the natural log of its softmax denominator of the
scaled scores, so that partial results over disjoint KV shards merge exactly (kernels/merge_attn_states.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, overload

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from diptych.kernels.dispatch import use_triton

LOG2_E = 1.4426950408889634  # 1/ln 2: the kernels use exp2, so log2(e) is folded into the softmax scale
LN_2 = tl.constexpr(0.6931471805599453)  # ln 2: converts the base-2 LSE back to natural log (read in-kernel)


# Lazy rescaling keeps a row's running max until the tile max exceeds it by more than this (log2 units), so
# p stays below 2^8: no overflow in fp32 sums nor in the half-precision p fed to the PV dot (FA4 uses 8 too).
RESCALE_THRESHOLD = tl.constexpr(8.0)


@dataclass(frozen=True)
class TileConfig:
    """One launch shape: query rows x keys per tile, warps per program, software-pipeline depth, and the
    structural variants bench/sweep_prefill_attention.py compares (all off: the kernel as first tuned)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    # Rescale acc and l only in tiles where some row's max grows by more than RESCALE_THRESHOLD (FA4).
    lazy_rescale: bool = False
    # Each program takes a heavy query tile and its light mirror (tiles n-1-p and p): equal work per program.
    paired: bool = False
    # ptxas register cap per thread (.maxnreg); 128 lets two 8-warp programs share an SM. None: no cap.
    max_registers: int | None = None

    def __post_init__(self) -> None:
        assert _is_power_of_two(self.block_m) and self.block_m >= 16, "tl.dot needs M >= 16, a power of 2"
        assert _is_power_of_two(self.block_n) and self.block_n >= 16, "tl.dot needs N >= 16, a power of 2"
        assert _is_power_of_two(self.num_warps) and self.num_stages >= 1
        assert self.max_registers is None or 24 <= self.max_registers <= 255, "ptxas takes 24..255"


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


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
def _tile_rows(
    table_ptr,
    n0,
    kv_len,
    rows_in_tile,
    page_in_tile,
    stride_cache_block,
    stride_cache_slot,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Cache offsets of keys n0 .. n0 + BLOCK_N (n0 a multiple of BLOCK_N); keys at or past kv_len get page
    0 (their loads are masked). rows_in_tile / page_in_tile are the parts every tile shares."""
    if BLOCK_SIZE >= BLOCK_N:
        # The tile lies in one page: one table entry, and its slots follow each other.
        page = tl.load(table_ptr + n0 // BLOCK_SIZE, mask=n0 < kv_len, other=0)
        return page.to(tl.int64) * stride_cache_block + (n0 % BLOCK_SIZE) * stride_cache_slot + rows_in_tile
    else:
        # BLOCK_N // BLOCK_SIZE pages: each row reads its page's entry (same address within a page).
        in_range = n0 + tl.arange(0, BLOCK_N) < kv_len
        pages = tl.load(table_ptr + n0 // BLOCK_SIZE + page_in_tile, mask=in_range, other=0)
        return pages.to(tl.int64) * stride_cache_block + rows_in_tile


@triton.jit
def _softmax_step(
    acc,
    m_i,
    l_i,
    qk,
    v,
    n0,
    positions,
    qk_scale,
    MASKED: tl.constexpr,
    LAZY_RESCALE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One key tile's online-softmax update (base 2) from its raw scores qk; MASKED applies the causal/length
    mask. The scores stay unscaled until the max: qk_scale then rides in the FMA that subtracts it, so it
    costs no instruction of its own and q is not rounded again in half precision."""
    if MASKED:
        # A real row's position is below kv_len, so this also hides the keys past it.
        visible = n0 + tl.arange(0, BLOCK_N)[None, :] <= positions[:, None]
        qk = tl.where(visible, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    else:
        m_new = tl.maximum(m_i, tl.max(qk, axis=1) * qk_scale)  # qk_scale > 0: the max commutes
    if LAZY_RESCALE:
        # One uniform branch per tile: after the first tiles the max rarely grows by 2^8, and then
        # acc * alpha (BLOCK_M x HEAD_DIM multiplies) and the alpha exp2s are skipped.
        if tl.max(m_new - m_i, axis=0) > RESCALE_THRESHOLD:
            alpha = tl.exp2(m_i - m_new)
            acc = acc * alpha[:, None]
            l_i = l_i * alpha
            m_i = m_new
        m_new = m_i
    p = tl.exp2(qk - m_new[:, None]) if MASKED else tl.exp2(qk * qk_scale - m_new[:, None])
    if LAZY_RESCALE:
        l_i = l_i + tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    else:
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attend_tiles(
    acc,
    m_i,
    l_i,
    q,
    k_cache_ptr,
    v_cache_ptr,
    table_ptr,
    rows_in_tile,
    page_in_tile,
    stride_cache_block,
    stride_cache_slot,
    kv_len,
    positions,
    qk_scale,
    start,
    end,
    MASKED: tl.constexpr,
    LAZY_RESCALE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online-softmax accumulation over keys [start, end), start a multiple of BLOCK_N."""
    offs_j = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    # The page-table entries of each tile are read one iteration ahead, into registers. Read in the same
    # iteration, they would be one more asynchronous load in the chain feeding K/V, and Triton's pipeliner
    # would then issue K/V only one iteration ahead, waiting on them at once (seen in the sm_90 TTGIR).
    rows_next = _tile_rows(
        table_ptr, start, kv_len, rows_in_tile, page_in_tile, stride_cache_block, stride_cache_slot,
        BLOCK_SIZE, BLOCK_N,
    )  # fmt: skip
    for n0 in tl.range(start, end, BLOCK_N):
        n0 = tl.multiple_of(n0, BLOCK_N)
        rows = rows_next
        rows_next = _tile_rows(
            table_ptr, n0 + BLOCK_N, kv_len, rows_in_tile, page_in_tile, stride_cache_block,
            stride_cache_slot, BLOCK_SIZE, BLOCK_N,
        )  # fmt: skip
        kv_offsets = rows[:, None] + offs_d[None, :]
        if MASKED:
            in_range = (n0 + offs_j < kv_len)[:, None]
            k = tl.load(k_cache_ptr + kv_offsets, mask=in_range, other=0.0)
            v = tl.load(v_cache_ptr + kv_offsets, mask=in_range, other=0.0)
        else:
            k = tl.load(k_cache_ptr + kv_offsets)
            v = tl.load(v_cache_ptr + kv_offsets)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        acc, m_i, l_i = _softmax_step(
            acc, m_i, l_i, qk, v, n0, positions, qk_scale, MASKED, LAZY_RESCALE, BLOCK_N, DOT_PRECISION
        )
    return acc, m_i, l_i


@triton.jit
def _query_tile(
    tile,
    head,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    lse_ptr,
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
    qk_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    LAZY_RESCALE: tl.constexpr,
    RETURN_LSE: tl.constexpr,
):
    """Attention of one query tile (BLOCK_M rows of one sequence) of one head; nothing for a spare tile.
    RETURN_LSE: also each row's natural-log LSE into lse_ptr [T, num heads] (fp32)."""
    seq = _find_sequence(cu_seqlens_q_ptr, num_seqs, tile, BLOCK_M)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    m0 = (tile - (q_start // BLOCK_M + seq)) * BLOCK_M
    if m0 < q_len:  # else a spare tile past this sequence's last
        kv_len = tl.load(kv_lens_ptr + seq)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m[:, None] < q_len
        q_offsets = (q_start + offs_m).to(tl.int64)[:, None] * stride_q_token + head * stride_q_head
        q = tl.load(q_ptr + q_offsets + offs_d[None, :], mask=row_ok, other=0.0)

        # The in-page part of each key row's cache offset is the same for every key tile: computed once.
        offs_j = tl.arange(0, BLOCK_N)
        head_offset = (head // GROUP) * stride_cache_head
        rows_in_tile = (offs_j % BLOCK_SIZE) * stride_cache_slot + head_offset
        page_in_tile = offs_j // BLOCK_SIZE

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        table_ptr = block_tables_ptr + seq * stride_table_seq
        prefix = kv_len - q_len
        positions = prefix + offs_m
        # Key tiles wholly at or before the tile's first query position are visible to all its rows: no
        # mask. The rest, up to its last query position (at least one tile), are masked; tiles past that are
        # skipped. Two loops, not one with a per-tile branch: Triton 3.6's pipeliner fails on that (sm_90).
        unmasked_end = (prefix + m0 + 1) // BLOCK_N * BLOCK_N
        causal_end = tl.minimum(kv_len, prefix + m0 + BLOCK_M)
        acc, m_i, l_i = _attend_tiles(
            acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, table_ptr, rows_in_tile, page_in_tile,
            stride_cache_block, stride_cache_slot, kv_len, positions, qk_scale, 0, unmasked_end,
            False, LAZY_RESCALE, HEAD_DIM, BLOCK_SIZE, BLOCK_N, DOT_PRECISION,
        )  # fmt: skip
        acc, m_i, l_i = _attend_tiles(
            acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, table_ptr, rows_in_tile, page_in_tile,
            stride_cache_block, stride_cache_slot, kv_len, positions, qk_scale, unmasked_end,
            causal_end, True, LAZY_RESCALE, HEAD_DIM, BLOCK_SIZE, BLOCK_N, DOT_PRECISION,
        )  # fmt: skip
        out = acc * (1.0 / l_i)[:, None]  # one reciprocal per row, not one division per element
        out_offsets = (q_start + offs_m).to(tl.int64)[:, None] * stride_out_token + head * stride_out_head
        tl.store(out_ptr + out_offsets + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok)
        if RETURN_LSE:
            # Every real row sees at least its own key, so l_i > 0 (with lazy rescaling, m_i is the max
            # its p were taken against: still the LSE's offset).
            lse_offsets = (q_start + offs_m).to(tl.int64) * tl.num_programs(1) + head
            tl.store(lse_ptr + lse_offsets, (m_i + tl.log2(l_i)) * LN_2, mask=offs_m < q_len)


# num_seqs and the block-table width (stride_table_seq) change from step to step: specialising on them (Triton
# does for 1 and multiples of 16) compiles a new variant mid-serving, for seconds, the first time a step
# batches 2 prompts or holds a prompt of other than a multiple of 256 tokens, stalling every queued request
# (a 3.5 s first-request stall in bench/disagg_serving.py: 60 ms once it no longer specialised on them).
@triton.jit(do_not_specialize=["num_seqs", "stride_table_seq"])
def _prefill_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    lse_ptr,
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
    qk_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    LAZY_RESCALE: tl.constexpr,
    PAIRED: tl.constexpr,
    RETURN_LSE: tl.constexpr,
):
    # Heaviest tiles first: a later query tile sees more keys, so the grid runs from the last tile back and
    # the last programs to start are the short ones. Tiles are the fastest grid axis, so the programs that
    # run together share one head's K/V in the L2. PAIRED: program p takes tile n-1-p, then tile p.
    pid = tl.program_id(0)
    head = tl.program_id(1)
    num_tiles = tl.load(cu_seqlens_q_ptr + num_seqs) // BLOCK_M + num_seqs if PAIRED else tl.num_programs(0)
    last = num_tiles - 1 - pid
    _query_tile(
        last, head, q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, lse_ptr, cu_seqlens_q_ptr, kv_lens_ptr,
        block_tables_ptr, stride_q_token, stride_q_head, stride_out_token, stride_out_head,
        stride_cache_block, stride_cache_slot, stride_cache_head, stride_table_seq, num_seqs, qk_scale,
        GROUP, HEAD_DIM, BLOCK_SIZE, BLOCK_M, BLOCK_N, DOT_PRECISION, LAZY_RESCALE, RETURN_LSE,
    )  # fmt: skip
    if PAIRED:  # noqa: SIM102 (a constexpr: `and` would put a runtime test in the default build)
        if pid < last:
            _query_tile(
                pid, head, q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, lse_ptr, cu_seqlens_q_ptr,
                kv_lens_ptr, block_tables_ptr, stride_q_token, stride_q_head, stride_out_token,
                stride_out_head, stride_cache_block, stride_cache_slot, stride_cache_head,
                stride_table_seq, num_seqs, qk_scale, GROUP, HEAD_DIM, BLOCK_SIZE, BLOCK_M, BLOCK_N,
                DOT_PRECISION, LAZY_RESCALE, RETURN_LSE,
            )  # fmt: skip


def default_tile_config(q: torch.Tensor) -> TileConfig:
    """The launch shape prefill_attention_triton takes when given none; bench/sweep_prefill_attention.py
    measures the alternatives. On an H200 with Triton 3.6 (bf16, head dim 128, 16-token pages) 128 x 128
    tiles, 8 warps and 3 stages were the fastest of 18 at 4096 and 16384 tokens (0.70 and 0.79 of SDPA;
    128 x 64: 0.67 and 0.77). Pairing each heavy causal tile with its light mirror in one program measured
    +0.02 at 4096 and -0.02 at 16384 in the second sweep (0.72 / 0.78 against 0.70 / 0.80), about a wash;
    255 registers, 28 bytes spilled. Lazy rescaling lost everywhere."""
    if not q.is_cuda:
        return TileConfig(16, 16, 4, 1)  # interpreter: the smallest tl.dot tiles keep test shapes small
    if q.shape[2] <= 64:
        return TileConfig(128, 64, 4, 3)
    return TileConfig(128, 128, 8, 3, paired=True)


@overload
def prefill_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    kv_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    config: TileConfig | None = None,
    *,
    return_lse: Literal[False] = False,
) -> torch.Tensor: ...
@overload
def prefill_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    kv_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    config: TileConfig | None = None,
    *,
    return_lse: Literal[True],
) -> tuple[torch.Tensor, torch.Tensor]: ...
def prefill_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    kv_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    config: TileConfig | None = None,
    *,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """As prefill_attention; `config` overrides the tile shape (the sweep in bench/ tries several)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_seqs = kv_lens.shape[0]
    block_size = k_cache.shape[1]
    assert q.stride(2) == 1 and q.dtype == k_cache.dtype == v_cache.dtype
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
    assert k_cache.shape[3] == head_dim and num_q_heads % k_cache.shape[2] == 0
    assert head_dim in (16, 32, 64, 128, 256), "head dim must be a power of 2 in 16..256"
    assert _is_power_of_two(block_size), "KV block size must be a power of 2 (the kernel shifts and masks)"
    assert cu_seqlens_q.shape == (num_seqs + 1,) and cu_seqlens_q.dtype == kv_lens.dtype == torch.int32
    assert block_tables.dim() == 2 and block_tables.shape[0] == num_seqs and block_tables.stride(1) == 1
    assert block_tables.dtype == torch.int32
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    # [T, Hq] contiguous: the kernel addresses a row's LSE as token * Hq + head.
    lse = torch.empty((num_tokens, num_q_heads), dtype=torch.float32, device=q.device) if return_lse else None
    if num_tokens == 0:
        return out if lse is None else (out, lse)
    config = config or default_tile_config(q)
    num_tiles = num_tokens // config.block_m + num_seqs
    _prefill_attention_kernel[(-(-num_tiles // 2) if config.paired else num_tiles, num_q_heads)](
        q,
        k_cache,
        v_cache,
        out,
        lse,  # None without RETURN_LSE: a constexpr the default build never reads
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
        scale * LOG2_E,
        GROUP=num_q_heads // k_cache.shape[2],
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 stays exact, not tf32
        LAZY_RESCALE=config.lazy_rescale,
        PAIRED=config.paired,
        RETURN_LSE=return_lse,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **({} if config.max_registers is None else {"maxnreg": config.max_registers}),
    )
    return out if lse is None else (out, lse)


def _gather(cache: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """[length, Hk, D]: the first `length` cached tokens of one sequence, blocks in table order."""
    num_blocks = -(-length // cache.shape[1])
    return cache.index_select(0, table[:num_blocks].long()).flatten(0, 1)[:length]


@overload
def prefill_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    kv_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    *,
    return_lse: Literal[False] = False,
) -> torch.Tensor: ...
@overload
def prefill_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    kv_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    *,
    return_lse: Literal[True],
) -> tuple[torch.Tensor, torch.Tensor]: ...
def prefill_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    kv_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    *,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device) if return_lse else None
    bounds, lens = cu_seqlens_q.tolist(), kv_lens.tolist()
    for b, kv_len in enumerate(lens):
        start, end = bounds[b], bounds[b + 1]
        if start == end:
            continue
        # [1, H, L, D]: 4-D inputs and GQA through enable_gqa let torch take its flash kernel on CPU.
        k = _gather(k_cache, block_tables[b], kv_len).transpose(0, 1).unsqueeze(0).to(q.dtype)
        v = _gather(v_cache, block_tables[b], kv_len).transpose(0, 1).unsqueeze(0).to(q.dtype)
        q_b = q[start:end].transpose(0, 1).unsqueeze(0)
        causal = _causal_mask(end - start, kv_len, q.device)
        o = F.scaled_dot_product_attention(
            q_b, k, v, attn_mask=causal, is_causal=causal is None, scale=scale, enable_gqa=True
        )
        out[start:end] = o[0].transpose(0, 1)
        if lse is not None:
            lse[start:end] = _logsumexp(q_b, k, _visible(end - start, kv_len, q.device), scale).transpose(
                0, 1
            )
    return out if lse is None else (out, lse)


def _logsumexp(q: torch.Tensor, k: torch.Tensor, visible: torch.Tensor, scale: float) -> torch.Tensor:
    """[Hq, M] fp32 logsumexp of the scaled scores each query row sees: q [1, Hq, M, D], k [1, Hk, L, D]."""
    group = q.shape[1] // k.shape[1]
    scores = torch.matmul(q[0].float(), k[0].float().repeat_interleave(group, dim=0).transpose(1, 2))
    return torch.logsumexp((scores * scale).masked_fill(~visible, float("-inf")), dim=-1)


def _visible(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """[q_len, kv_len] bool: row i may see key j iff j <= (kv_len - q_len) + i, a causal mask shifted by the
    cached prefix."""
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)


def _causal_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor | None:
    """_visible, or None when nothing is cached: SDPA's own is_causal (aligned top-left) is then the same."""
    if q_len == kv_len:
        return None
    return _visible(q_len, kv_len, device)


@overload
def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    kv_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    *,
    return_lse: Literal[False] = False,
) -> torch.Tensor: ...
@overload
def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    kv_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    *,
    return_lse: Literal[True],
) -> tuple[torch.Tensor, torch.Tensor]: ...
def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    kv_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    *,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], caches [num_blocks, block_size, Hk, D] -> [T, Hq, D] in q.dtype (GQA: Hq % Hk == 0);
    with return_lse, (out, lse [T, Hq] fp32)."""
    if use_triton(q):
        if return_lse:
            return prefill_attention_triton(
                q, k_cache, v_cache, cu_seqlens_q, kv_lens, block_tables, scale, return_lse=True
            )
        return prefill_attention_triton(q, k_cache, v_cache, cu_seqlens_q, kv_lens, block_tables, scale)
    if return_lse:
        return prefill_attention_reference(
            q, k_cache, v_cache, cu_seqlens_q, kv_lens, block_tables, scale, return_lse=True
        )
    return prefill_attention_reference(q, k_cache, v_cache, cu_seqlens_q, kv_lens, block_tables, scale)
