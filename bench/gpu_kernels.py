"""Attention kernels on one GPU against ceilings measured in the same run.

    python -m bench.gpu_kernels

- decode_attention_B{b}_L{l}: paged decode attention, 32 query / 8 KV heads of 128, bf16, blocks of 16
  tokens scattered at random; bytes of K and V read per second against the HBM copy bandwidth.
- prefill_attention_L{l}: paged causal prefill attention of one sequence, 32 heads of 128, bf16; TFLOP/s
  against torch SDPA (causal, same shapes, contiguous K/V) timed here.

Each time is triton.testing.do_bench's median; small cases cycle through several copies of their inputs
so that every call reads them from HBM, not from the L2.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton.testing

from bench.ceilings import against_target, copy_bandwidth
from bench.results import Row, write_result
from diptych.kernels.decode_attention import DecodeTileConfig, decode_attention_triton
from diptych.kernels.prefill_attention import TileConfig, prefill_attention_triton

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DECODE_CASES = ((32, 8192), (1, 8192), (128, 8192), (32, 1024), (32, 32768))  # (batch, context)
PREFILL_LENGTHS = (4096, 16384)
DECODE_TARGET = PREFILL_TARGET = 0.90
DTYPE = torch.bfloat16


def median_s(fn: Callable[[], object]) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3


def num_copies(nbytes: int) -> int:
    """Copies of a case's inputs that together span 4x the L2, so each call reads cold data."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20)  # 64 MiB if unreported
    return max(1, min(8, -(-4 * l2 // nbytes)))


def rotating(calls: Sequence[Callable[[], object]]) -> Callable[[], None]:
    order = itertools.cycle(calls)

    def run() -> None:
        next(order)()

    return run


def random_tables(batch: int, blocks_per_seq: int) -> torch.Tensor:
    """Each sequence's blocks scattered over the cache, as an engine's block manager leaves them."""
    perm = torch.randperm(batch * blocks_per_seq, device="cuda", dtype=torch.int64)
    return perm.to(torch.int32).view(batch, blocks_per_seq)


@dataclass(frozen=True)
class DecodeInputs:
    """One copy of a (batch, context) decode case: every sequence `context` tokens long."""

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    kv_lens: torch.Tensor
    tables: torch.Tensor

    def call(self, config: DecodeTileConfig | None = None) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        args = (self.q, self.k_cache, self.v_cache, self.kv_lens, self.tables, HEAD_DIM**-0.5)
        return lambda: decode_attention_triton(*args, config=config)


def decode_inputs(batch: int, context: int) -> DecodeInputs:
    blocks = context // BLOCK_SIZE
    shape = (batch * blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    return DecodeInputs(
        q=torch.randn(batch, NUM_Q_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda"),
        k_cache=torch.randn(shape, dtype=DTYPE, device="cuda"),
        v_cache=torch.randn(shape, dtype=DTYPE, device="cuda"),
        kv_lens=torch.full((batch,), context, dtype=torch.int32, device="cuda"),
        tables=random_tables(batch, blocks),
    )


def kv_bytes(batch: int, context: int) -> int:
    """K and V bytes a decode call reads."""
    return 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize


def bench_decode(batch: int, context: int, bandwidth: float) -> Row:
    nbytes = kv_bytes(batch, context)
    copies = [decode_inputs(batch, context).call() for _ in range(num_copies(nbytes))]
    seconds = median_s(rotating(copies))
    row = Row(
        f"decode_attention_B{batch}_L{context}",
        nbytes / seconds / 1e9,
        "GB/s",
        ceiling=bandwidth / 1e9,
        note=f"{seconds * 1e3:.3f} ms",
    )
    return against_target(row, DECODE_TARGET)


def causal_flops(length: int) -> float:
    """QK^T and PV over the causal half of the score matrix (the same count for both kernels)."""
    return 2 * 2 * NUM_Q_HEADS * HEAD_DIM * length * length / 2


@dataclass(frozen=True)
class PrefillInputs:
    """One sequence of `length` tokens: paged inputs for ours (K/V in blocks scattered at random), the same
    values as contiguous [1, H, L, D] copies for SDPA."""

    length: int
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    cu_seqlens: torch.Tensor
    kv_lens: torch.Tensor
    tables: torch.Tensor
    sdpa_inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]

    @property
    def scale(self) -> float:
        return HEAD_DIM**-0.5

    def ours(self, config: TileConfig | None = None) -> Callable[[], torch.Tensor]:
        args = (self.q, self.k_cache, self.v_cache, self.cu_seqlens, self.kv_lens, self.tables, self.scale)
        return lambda: prefill_attention_triton(*args, config=config)

    def sdpa(self) -> torch.Tensor:
        return F.scaled_dot_product_attention(*self.sdpa_inputs, is_causal=True, scale=self.scale)


def prefill_inputs(length: int) -> PrefillInputs:
    q, k, v = (torch.randn(length, NUM_Q_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda") for _ in range(3))
    tables = random_tables(1, length // BLOCK_SIZE)
    page_shape = (BLOCK_SIZE, NUM_Q_HEADS, HEAD_DIM)
    caches = []
    for dense in (k, v):
        cache = torch.empty(length // BLOCK_SIZE, *page_shape, dtype=DTYPE, device="cuda")
        cache[tables[0].long()] = dense.view(-1, *page_shape)
        caches.append(cache)
    sdpa_q, sdpa_k, sdpa_v = (x.transpose(0, 1).unsqueeze(0).contiguous() for x in (q, k, v))
    return PrefillInputs(
        length=length,
        q=q,
        k_cache=caches[0],
        v_cache=caches[1],
        cu_seqlens=torch.tensor([0, length], dtype=torch.int32, device="cuda"),
        kv_lens=torch.tensor([length], dtype=torch.int32, device="cuda"),
        tables=tables,
        sdpa_inputs=(sdpa_q, sdpa_k, sdpa_v),
    )


def bench_prefill(length: int) -> list[Row]:
    inputs = prefill_inputs(length)
    ours, sdpa = inputs.ours(), inputs.sdpa
    # The same answer first: a fast wrong kernel is no result.
    error = (ours() - sdpa()[0].transpose(0, 1)).abs().max().item()
    flops = causal_flops(length)
    ours_rate, sdpa_rate = flops / median_s(ours) / 1e12, flops / median_s(sdpa) / 1e12
    name = f"prefill_attention_L{length}"
    row = Row(name, ours_rate, "TFLOP/s", ceiling=sdpa_rate, system="diptych", note=f"max |diff| {error:.1e}")
    return [against_target(row, PREFILL_TARGET), Row(name, sdpa_rate, "TFLOP/s", system="torch_sdpa")]


def main() -> None:
    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args()
    torch.manual_seed(0)
    bandwidth = copy_bandwidth()
    rows = []
    for batch, context in DECODE_CASES:
        rows.append(bench_decode(batch, context, bandwidth))
        torch.cuda.empty_cache()
    for length in PREFILL_LENGTHS:
        rows.extend(bench_prefill(length))
        torch.cuda.empty_cache()
    write_result(
        "gpu_kernels",
        rows,
        extra={
            "hbm_copy_bandwidth_GBps": bandwidth / 1e9,
            "decode_shape": f"{NUM_Q_HEADS} q / {NUM_KV_HEADS} kv heads x {HEAD_DIM}, block {BLOCK_SIZE}",
            "prefill_shape": f"{NUM_Q_HEADS} heads x {HEAD_DIM}, batch 1, causal",
        },
    )


if __name__ == "__main__":
    main()
