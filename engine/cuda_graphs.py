"""CUDA graphs of the decode forward, one per batch-size bucket (capture once, replay every step).

A decode step of a small batch is a few hundred short kernels, so launching them costs more than running
them; a captured graph replays them in one launch. Every graph reads the same static input buffers and
writes the same static output; a batch is padded up to the next captured size, its padding rows writing
no KV (slot -1) and attending to nothing (kv_len 0). The sampler runs outside, on the returned hidden rows.
"""

from __future__ import annotations

import torch

from engine.forward_context import AttentionMetadata, forward_context
from engine.model import LlamaForCausalLM

MAX_GRAPH_BATCH = 256  # past this a decode step is long enough that launches no longer matter


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, then every multiple of 8, up to max_num_seqs (itself included) or 256."""
    top = min(max_num_seqs, MAX_GRAPH_BATCH)
    return [b for b in (1, 2, 4, *range(8, top, 8)) if b < top] + [top]


class DecodeGraphs:
    """Captures the model's decode forward per bucket (largest first, one memory pool) and replays it."""

    def __init__(self, model: LlamaForCausalLM, max_num_seqs: int, max_blocks_per_seq: int) -> None:
        self.model = model
        self.batch_sizes = graph_batch_sizes(max_num_seqs)
        weight = model.model.embed_tokens.weight
        rows, device = self.batch_sizes[-1], weight.device
        self.input_ids = torch.zeros(rows, dtype=torch.int64, device=device)
        self.positions = torch.zeros(rows, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((rows,), -1, dtype=torch.int64, device=device)
        self.kv_lens = torch.zeros(rows, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(rows, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.cu_seqlens_q = torch.arange(rows + 1, dtype=torch.int32, device=device)  # one query per row
        self.hidden = torch.zeros(rows, model.config.hidden_size, dtype=weight.dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._capture()

    @property
    def max_batch_size(self) -> int:
        return self.batch_sizes[-1]

    def can_replay(self, meta: AttentionMetadata) -> bool:
        """A pure-decode step that fits the largest graph; a KV hook is Python, so it cannot be replayed."""
        return (
            meta.is_decode
            and meta.kv_hook is None
            and meta.slot_mapping.shape[0] <= self.max_batch_size
            and meta.block_tables.shape[1] <= self.block_tables.shape[1]
        )

    def replay(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Final hidden states [n, hidden] of a decode batch of n rows; valid until the next replay."""
        n = input_ids.shape[0]
        size = next(b for b in self.batch_sizes if b >= n)
        self.input_ids[:n] = input_ids
        self.positions[:n] = positions
        self.slot_mapping[:n] = meta.slot_mapping
        self.slot_mapping[n:size] = -1  # rows left over from a larger batch must not write KV
        self.kv_lens[:n] = meta.kv_lens
        self.kv_lens[n:size] = 0
        # Columns past the batch's width may be stale: attention reads only the first kv_len tokens' blocks.
        self.block_tables[:n, : meta.block_tables.shape[1]] = meta.block_tables
        self.graphs[size].replay()
        return self.hidden[:n]

    def _meta(self, size: int) -> AttentionMetadata:
        # The decode kernel picks its number of KV splits from the block-table width, fixed here per graph.
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            cu_seqlens_q=self.cu_seqlens_q[: size + 1],
            kv_lens=self.kv_lens[:size],
            block_tables=self.block_tables[:size],
            is_decode=True,
        )

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for size in reversed(self.batch_sizes):  # largest first: the smaller graphs fit in its pool
            graph = torch.cuda.CUDAGraph()
            with forward_context(self._meta(size)):
                # Warm-up outside the graph: Triton compiles and cuBLAS picks its kernels here.
                self.hidden[:size] = self.model(self.input_ids[:size], self.positions[:size])
                with torch.cuda.graph(graph, pool):
                    self.hidden[:size] = self.model(self.input_ids[:size], self.positions[:size])
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()
