"""CUDA graphs of the decode forward, one per batch-size bucket (capture once, replay every step).

A decode step of a small batch is a few hundred short kernels, so launching them costs more than running
them; a captured graph replays them in one launch. A batch is padded up to the next captured size, its
padding rows writing no KV (slot -1) and attending to nothing (kv_len 0). The sampler runs outside, on the
returned hidden rows.

Each graph reads its per-row inputs (token ids, positions, slots, KV lengths) from one packed byte buffer of
its own, laid out by `packed_offsets`. The model runner packs a step's inputs the same way on the host, the
padding rows already filled in, so staging them for a replay is one device copy of that buffer plus one of
the block tables (the graph's tables are wider than a step's, so they cannot share the packed buffer).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from diptych.engine.forward_context import AttentionMetadata, forward_context
from diptych.engine.model import LlamaForCausalLM

MAX_GRAPH_BATCH = 256  # past this a decode step is long enough that launches no longer matter
PACK_ALIGN = 16  # bytes: every packed tensor starts 16-byte aligned, as Triton's pointer specialisation likes

# The per-row inputs of a decode batch, in the order they are packed: input ids, positions, slot mapping,
# KV lengths. The model runner packs every step's inputs with these in front.
DECODE_INPUT_DTYPES = (torch.int64, torch.int64, torch.int64, torch.int32)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, then every multiple of 8, up to max_num_seqs (itself included) or 256."""
    top = min(max_num_seqs, MAX_GRAPH_BATCH)
    return [b for b in (1, 2, 4, *range(8, top, 8)) if b < top] + [top]


def packed_offsets(fields: Sequence[tuple[int, torch.dtype]]) -> list[int]:
    """Byte offset of each (numel, dtype) field packed back to back, each PACK_ALIGN-aligned; then the
    buffer's size."""
    offsets = [0]
    for numel, dtype in fields:
        offsets.append(offsets[-1] + -(-numel * dtype.itemsize // PACK_ALIGN) * PACK_ALIGN)
    return offsets


def unpack(
    buffer: torch.Tensor, fields: Sequence[tuple[int, torch.dtype]], offsets: Sequence[int] | None = None
) -> list[torch.Tensor]:
    """1-D views of a uint8 buffer laid out by packed_offsets(fields) (pass offsets if already known)."""
    offsets = offsets or packed_offsets(fields)
    # One reinterpreting view per dtype, then a slice per field: half the tensor ops of view per field.
    typed = {dtype: buffer.view(dtype) for dtype in {dtype for _, dtype in fields}}
    return [
        typed[dtype][start // dtype.itemsize : start // dtype.itemsize + numel]
        for start, (numel, dtype) in zip(offsets, fields)
    ]


def decode_input_fields(rows: int) -> list[tuple[int, torch.dtype]]:
    return [(rows, dtype) for dtype in DECODE_INPUT_DTYPES]


class DecodeGraphs:
    """Captures the model's decode forward per bucket (largest first, one memory pool) and replays it."""

    def __init__(self, model: LlamaForCausalLM, max_num_seqs: int, max_blocks_per_seq: int) -> None:
        self.model = model
        self.batch_sizes = graph_batch_sizes(max_num_seqs)
        weight = model.model.embed_tokens.weight
        rows, device = self.batch_sizes[-1], weight.device
        self.inputs: dict[int, torch.Tensor] = {}  # bucket -> its packed ids, positions, slots, kv_lens
        for size in self.batch_sizes:
            fields = decode_input_fields(size)
            self.inputs[size] = torch.zeros(packed_offsets(fields)[-1], dtype=torch.uint8, device=device)
            unpack(self.inputs[size], fields)[2].fill_(-1)  # slots: no row writes KV until one is given
        self.block_tables = torch.zeros(rows, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.cu_seqlens_q = torch.arange(rows + 1, dtype=torch.int32, device=device)  # one query per row
        self.hidden = torch.zeros(rows, model.config.hidden_size, dtype=weight.dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._capture()

    @property
    def max_batch_size(self) -> int:
        return self.batch_sizes[-1]

    def padded_size(self, num_rows: int, table_width: int) -> int | None:
        """The captured size a decode batch of num_rows rows, block tables this wide, replays at; None when
        no graph fits it."""
        if num_rows > self.max_batch_size or table_width > self.block_tables.shape[1]:
            return None
        return next(b for b in self.batch_sizes if b >= num_rows)

    def can_replay(self, meta: AttentionMetadata) -> bool:
        """A pure-decode step that fits the largest graph; a KV hook is Python, so it cannot be replayed."""
        return (
            meta.is_decode
            and meta.kv_hook is None
            and self.padded_size(meta.slot_mapping.shape[0], meta.block_tables.shape[1]) is not None
        )

    def replay(self, packed: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        """Final hidden states [n, hidden] of a decode batch of n rows; valid until the next replay.

        packed: the batch's ids, positions, slots and KV lengths laid out for its padded size (padding rows
        with slot -1 and kv_len 0); block_tables: [n, width] int32."""
        n, width = block_tables.shape
        size = self.padded_size(n, width)
        assert size is not None and packed.shape == self.inputs[size].shape, "inputs not packed for a graph"
        self.inputs[size].copy_(packed)
        # Columns past the batch's width may be stale: attention reads only the first kv_len tokens' blocks.
        self.block_tables[:n, :width].copy_(block_tables)
        self.graphs[size].replay()
        return self.hidden[:n]

    def _meta(self, size: int) -> AttentionMetadata:
        _, _, slot_mapping, kv_lens = unpack(self.inputs[size], decode_input_fields(size))
        # The decode kernel picks its number of KV splits from the block-table width, fixed here per graph.
        return AttentionMetadata(
            slot_mapping=slot_mapping,
            cu_seqlens_q=self.cu_seqlens_q[: size + 1],
            kv_lens=kv_lens,
            block_tables=self.block_tables[:size],
            is_decode=True,
        )

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for size in reversed(self.batch_sizes):  # largest first: the smaller graphs fit in its pool
            graph = torch.cuda.CUDAGraph()
            input_ids, positions, _, _ = unpack(self.inputs[size], decode_input_fields(size))
            with forward_context(self._meta(size)):
                # Warm-up outside the graph: Triton compiles and cuBLAS picks its kernels here.
                self.hidden[:size] = self.model(input_ids, positions)
                with torch.cuda.graph(graph, pool):
                    self.hidden[:size] = self.model(input_ids, positions)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()
