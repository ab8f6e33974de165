"""Paged decode attention: one query token per sequence over its cached KV, returning the LSE too.

The LSE (natural log of the softmax denominator of the scaled scores) lets partial results over disjoint
KV shards be merged exactly (kernels/merge_attn_states.py); a sequence with no cached tokens gets out = 0
and lse = -inf, so an empty shard merges as nothing.

Three paths: Triton on CUDA, a C kernel on the CPU for fp32 (csrc/decode_attention.c: reads the paged cache
in place, where the reference first gathers every sequence's K/V into a padded copy and costs 4-8x more at
decode sizes), and the torch reference otherwise.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from diptych.kernels import native
from diptych.kernels.dispatch import use_native, use_pdl, use_triton
from diptych.kernels.pdl import let_next_kernel_start, wait_for_previous_kernel
from diptych.kernels.step_scratch import StepScratch, derived

LOG2_E = 1.4426950408889634  # 1/ln 2: the kernels use exp2, so log2(e) is folded into the softmax scale
LN_2 = tl.constexpr(0.6931471805599453)  # ln 2: converts the base-2 LSE back to natural log (read in-kernel)
MIN_DOT_ROWS = 16  # tl.dot needs at least 16 rows: a query group is padded up to it
MIN_SPLIT_KEYS = 256  # fewer keys per split and a program's loads no longer cover its fixed costs
MAX_SPLITS = 64  # keeps the merge stage's split axis small


@dataclass(frozen=True)
class DecodeTileConfig:
    """One launch shape of the split kernel: keys per tile, warps per program, software-pipeline depth, and
    the programs per SM that the split count aims at (bench/sweep_decode_attention.py compares them)."""

    block_n: int
    num_warps: int
    num_stages: int
    programs_per_sm: int
    # Read each tile's page-table entries one iteration ahead (as the prefill kernel does), so that K/V
    # are not the second load of a dependent chain and the pipeliner can issue them num_stages - 1 ahead.
    table_ahead: bool = False

    def __post_init__(self) -> None:
        assert _is_power_of_two(self.block_n) and self.block_n >= 16, "tl.dot needs N >= 16, a power of 2"
        assert _is_power_of_two(self.num_warps) and self.num_stages >= 1 and self.programs_per_sm >= 1


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@triton.jit
def _tile_rows(table_ptr, n0, end, block_size, stride_cache_block, stride_cache_slot, BLOCK_N: tl.constexpr):
    """Cache row offsets of keys n0 .. n0 + BLOCK_N; keys at or past `end` get page 0 (their loads are
    masked)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    blocks = tl.load(table_ptr + offs_n // block_size, mask=offs_n < end, other=0)
    return blocks.to(tl.int64) * stride_cache_block + (offs_n % block_size) * stride_cache_slot


# The block-table width changes from step to step in eager decode: see _prefill_attention_kernel.
@triton.jit(do_not_specialize=["stride_table_seq"])
def _decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    kv_lens_ptr,
    block_tables_ptr,
    partial_out_ptr,
    partial_lse_ptr,
    out_ptr,
    lse_ptr,
    stride_q_seq,
    stride_q_head,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    stride_table_seq,
    stride_out_seq,
    stride_out_head,
    block_size,
    qk_scale,
    GROUP: tl.constexpr,
    NUM_Q_HEADS: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    TABLE_AHEAD: tl.constexpr,
    PDL: tl.constexpr,
):
    """One (sequence, KV head, split): the whole query group of that KV head against one slice of its keys.

    Writes the split's normalised output and its base-2 LSE (-inf and zeros for an empty slice) for
    _decode_merge_kernel; with one split, the output and natural-log LSE themselves (no merge launch).
    """
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    wait_for_previous_kernel(PDL)
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
    if TABLE_AHEAD:
        rows_next = _tile_rows(
            table_ptr, start, end, block_size, stride_cache_block, stride_cache_slot, BLOCK_N
        )
    for n0 in range(start, end, BLOCK_N):
        in_range = n0 + tl.arange(0, BLOCK_N) < end
        if TABLE_AHEAD:
            rows = rows_next
            rows_next = _tile_rows(
                table_ptr, n0 + BLOCK_N, end, block_size, stride_cache_block, stride_cache_slot, BLOCK_N
            )
        else:
            rows = _tile_rows(table_ptr, n0, end, block_size, stride_cache_block, stride_cache_slot, BLOCK_N)
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
    let_next_kernel_start(PDL)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    group_mask = offs_g < GROUP
    if NUM_SPLITS == 1:
        out_offsets = seq * stride_out_seq + heads[:, None] * stride_out_head + offs_d[None, :]
        tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=group_mask[:, None])
        tl.store(lse_ptr + seq * NUM_Q_HEADS + heads, lse * LN_2, mask=group_mask)
    else:
        partial_rows = (seq * NUM_Q_HEADS + heads) * NUM_SPLITS + split  # [B, Hq, NUM_SPLITS, (D)]
        tl.store(partial_lse_ptr + partial_rows, lse, mask=group_mask)
        partial_offsets = partial_rows[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(partial_out_ptr + partial_offsets, out, mask=group_mask[:, None])


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
    PDL: tl.constexpr,
):
    """Second stage: merges the NUM_SPLITS partials of one (sequence, query head) by their LSEs."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    wait_for_previous_kernel(PDL)
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
    let_next_kernel_start(PDL)
    tl.store(
        out_ptr + seq * stride_out_seq + head * stride_out_head + offs_d, out.to(out_ptr.dtype.element_ty)
    )
    tl.store(lse_ptr + row, tl.where(empty, float("-inf"), (lse_max + tl.log2(safe_total)) * LN_2))


def default_decode_config(q: torch.Tensor) -> DecodeTileConfig:
    """The launch shape decode_attention_triton takes when given none; bench/sweep_decode_attention.py
    measures the alternatives. On an H200 (bf16, 32 q / 8 KV heads of 128, 16-token pages) about two
    programs per SM (one wave: 110 registers let four co-reside, so four a SM made 1.45 waves) read K+V at
    0.98 of the copy bandwidth at B32 L8192 (four a SM: 0.85; an H100 measured 0.91 with four)."""
    if not q.is_cuda:
        # Interpreter: small tiles so that test contexts span many of them (the split count has its own rule).
        return DecodeTileConfig(16, 4, 1, programs_per_sm=4)
    block_n = 64 if q.shape[2] >= 128 else 128
    return DecodeTileConfig(block_n, 4, 3, programs_per_sm=2)


def default_num_splits(
    batch: int, num_kv_heads: int, max_tokens: int, device: torch.device, programs_per_sm: int = 4
) -> int:
    """Enough splits for about programs_per_sm programs per SM, each still reading at least MIN_SPLIT_KEYS.

    max_tokens is the block-table capacity, known on the host without a sync (and fixed under CUDA graphs).
    """
    if device.type != "cuda":
        return max(1, min(8, max_tokens // 64))  # interpreter: exercise the split path at test sizes
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    wanted = triton.cdiv(programs_per_sm * num_sms, max(1, batch * num_kv_heads))
    return max(1, min(wanted, max_tokens // MIN_SPLIT_KEYS, MAX_SPLITS))


def decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    config: DecodeTileConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As decode_attention; `config` overrides the launch shape (the sweep in bench/ tries several) and an
    explicit num_splits overrides the split count that config.programs_per_sm would give."""
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
    config = config or default_decode_config(q)
    if num_splits is None:
        max_tokens = block_tables.shape[1] * block_size
        num_splits = default_num_splits(batch, num_kv_heads, max_tokens, q.device, config.programs_per_sm)
    group = num_q_heads // num_kv_heads
    pdl = use_pdl(q)
    partial_out, partial_lse = out, lse  # one split writes the result itself
    if num_splits > 1:
        partial_out = torch.empty(
            (batch, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=q.device
        )
        partial_lse = torch.empty((batch, num_q_heads, num_splits), dtype=torch.float32, device=q.device)
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        kv_lens,
        block_tables,
        partial_out,
        partial_lse,
        out,
        lse,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        block_size,
        scale * LOG2_E,
        GROUP=group,
        NUM_Q_HEADS=num_q_heads,
        NUM_SPLITS=num_splits,
        HEAD_DIM=head_dim,
        BLOCK_G=max(MIN_DOT_ROWS, triton.next_power_of_2(group)),
        BLOCK_N=config.block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 stays exact, not tf32
        TABLE_AHEAD=config.table_ahead,
        PDL=pdl,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        launch_pdl=pdl,
    )
    if num_splits == 1:
        return out, lse
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
        PDL=pdl,
        launch_pdl=pdl,
    )
    return out, lse


@dataclass(frozen=True)
class _GatherPlan:
    """What the reference derives from one step's kv_lens and block tables, the same for every layer."""

    slots: torch.Tensor  # [B * L] int64 cache slots of each row's first L = max(kv_lens) tokens
    bias: torch.Tensor | None  # [B, 1, 1, L] fp32 score bias, -inf past a row's length; None: no row is short
    empty: torch.Tensor | None  # [B, 1, 1] bool, rows with no cached tokens; None when there are none
    run_start: int | None = None  # one row whose slots are consecutive from here: read a view, not a copy


def decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    *,
    scratch: StepScratch | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    # num_splits only tunes the Triton kernel's parallelism; the unsplit result is the same.
    batch, num_q_heads, _ = q.shape
    block_size = k_cache.shape[1]
    plan = derived(
        scratch,
        ("decode_attention.plan", block_size),
        lambda: _gather_plan(kv_lens, block_tables, block_size),
    )
    if plan.slots.numel() == 0:  # no row has a cached token (or there are no rows)
        lse = torch.full((batch, num_q_heads), float("-inf"), device=q.device)
        return torch.zeros_like(q), lse
    k, v = _gather(k_cache, plan, batch), _gather(v_cache, plan, batch)
    out, lse = _attend(q.float().unsqueeze(2), k, v, plan.bias, scale)  # [B, Hq, 1, D], [B, Hq, 1]
    if plan.empty is not None:  # they gathered arbitrary slots (stale NaN/inf included): out 0, lse -inf
        out.masked_fill_(plan.empty.unsqueeze(-1), 0.0)
        lse.masked_fill_(plan.empty, float("-inf"))
    return out.squeeze(2).to(q.dtype), lse.squeeze(2)


def _gather(cache: torch.Tensor, plan: _GatherPlan, batch: int) -> torch.Tensor:
    """[B, Hk, L, D] K or V of the plan's slots."""
    flat = cache.flatten(0, 1)
    if plan.run_start is not None:
        rows = flat[plan.run_start : plan.run_start + plan.slots.numel()]
    else:
        # index_select with flat indices: several times faster on CPU than indexing with a [B, L] index.
        rows = flat.index_select(0, plan.slots)
    return rows.view(batch, -1, *cache.shape[2:]).transpose(1, 2).float()


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(q k^T scale + bias) v, logsumexp of those scores): q [B, Hq, 1, D], k and v [B, Hk, L, D]."""
    if q.device.type == "cpu":
        # torch's CPU flash kernel does GQA and returns the LSE too: one op where the math below is ten.
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, attn_mask=bias, scale=scale
        )
    group = q.shape[1] // k.shape[1]
    scores = torch.matmul(q, k.repeat_interleave(group, dim=1).transpose(2, 3)) * scale
    if bias is not None:
        scores = scores + bias
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), v.repeat_interleave(group, dim=1))
    return out, lse


def _gather_plan(kv_lens: torch.Tensor, block_tables: torch.Tensor, block_size: int) -> _GatherPlan:
    """Positions past a row's length read the row's first slot instead of the table's padding, so every slot
    gathered for a non-empty row holds that row's own (finite) K/V and the -inf bias masks it exactly (an
    empty row's padding may be negative: clamped to slot 0, whose output is overwritten)."""
    max_len = int(kv_lens.max()) if kv_lens.numel() else 0
    positions = torch.arange(max_len, device=kv_lens.device)
    slots = block_tables[:, positions // block_size].long() * block_size + positions % block_size
    valid = positions < kv_lens[:, None]
    if bool(valid.all()):  # every row is max_len long (always so at batch 1): no mask, nothing to redirect
        flat = slots.flatten()
        consecutive = slots.shape[0] == 1 and bool((flat.diff() == 1).all())
        run_start = int(flat[0]) if consecutive and max_len else None
        return _GatherPlan(slots=flat, bias=None, empty=None, run_start=run_start)
    bias = torch.zeros(valid.shape, dtype=torch.float32, device=kv_lens.device)
    bias.masked_fill_(~valid, float("-inf"))
    empty = kv_lens == 0
    return _GatherPlan(
        slots=torch.where(valid, slots, slots[:, :1].clamp(min=0)).flatten(),
        bias=bias[:, None, None, :],
        empty=empty[:, None, None] if bool(empty.any()) else None,
    )


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    *,
    scratch: StepScratch | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hq, D] -> (out [B, Hq, D] in q.dtype, lse [B, Hq] fp32); kv_lens [B] int32 may hold zeros.
    scratch: the step's (kernels/step_scratch.py), when kv_lens and block_tables are its own."""
    if use_triton(q):
        return decode_attention_triton(q, k_cache, v_cache, kv_lens, block_tables, scale, num_splits)
    kernel = _NATIVE() if _takes_native_path(q, k_cache, kv_lens, block_tables) else None
    if kernel is not None:
        return decode_attention_native(kernel, q, k_cache, v_cache, kv_lens, block_tables, scale)
    return decode_attention_reference(
        q, k_cache, v_cache, kv_lens, block_tables, scale, num_splits, scratch=scratch
    )


_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
_NATIVE = functools.partial(
    native.native_function,
    "decode_attention",
    "paged_decode_attention",
    (
        _ptr,
        _ptr,
        _ptr,
        _ptr,
        _ptr,
        _i64,
        _i64,
        _i64,
        _i64,
        _i64,
        _i64,
        ctypes.c_float,
        _ptr,
        _ptr,
        ctypes.c_int,
    ),
)


def _takes_native_path(
    q: torch.Tensor, k_cache: torch.Tensor, kv_lens: torch.Tensor, block_tables: torch.Tensor
) -> bool:
    return (
        use_native(q)
        and q.dtype == k_cache.dtype == torch.float32
        and kv_lens.dtype == block_tables.dtype == torch.int32
    )


def decode_attention_native(
    kernel: Callable[..., None],
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The C kernel on CPU fp32 tensors: reads the cache through the block table in place."""
    batch, q_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the KV cache must be contiguous")
    q, kv_lens, block_tables = q.contiguous(), kv_lens.contiguous(), block_tables.contiguous()
    out = torch.empty(q.shape, dtype=torch.float32)
    lse = torch.empty(batch, q_heads, dtype=torch.float32)
    kernel(
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        kv_lens.data_ptr(),
        block_tables.data_ptr(),
        block_tables.shape[1],
        batch,
        q_heads,
        kv_heads,
        head_dim,
        block_size,
        scale,
        out.data_ptr(),
        lse.data_ptr(),
        torch.get_num_threads(),
    )
    return out, lse
