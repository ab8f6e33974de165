"""Turns a SchedulerOutput into tensors, runs the model, samples. Owns the model and the KV cache."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from engine.cuda_graphs import DecodeGraphs
from engine.forward_context import AttentionMetadata, KVHook, forward_context
from engine.kv_cache import PagedKVCache
from engine.model import LlamaForCausalLM
from engine.sampler import SamplingBatch, sample
from engine.scheduler import ScheduledChunk, SchedulerOutput


@dataclass(frozen=True)
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # [S] rows of the flat batch whose logits are sampled (last of each chunk)


@dataclass(frozen=True)
class SampledTokens:
    token_ids: list[int]  # one per sampling chunk, in chunk order
    logprobs: list[float] | None


def block_tables_tensor(tables: Seq[Seq[int]], device: torch.device) -> torch.Tensor:
    width = max((len(t) for t in tables), default=0) or 1
    rows = [list(t) + [0] * (width - len(t)) for t in tables]
    return torch.tensor(rows, dtype=torch.int32, device=device)


def slots_for(table: Seq[int], start: int, num_tokens: int, block_size: int) -> list[int]:
    return [table[p // block_size] * block_size + p % block_size for p in range(start, start + num_tokens)]


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_cache: PagedKVCache, device: torch.device) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.block_size = kv_cache.block_size
        kv_cache.bind(model)
        self.graphs: DecodeGraphs | None = None

    def capture_decode_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        """CUDA only: capture the decode forward; pure-decode steps that fit replay it from now on."""
        assert self.device.type == "cuda", "CUDA graphs need a CUDA device"
        self.graphs = DecodeGraphs(self.model, max_num_seqs, -(-max_model_len // self.block_size))

    def prepare(
        self, chunks: Seq[ScheduledChunk], tables: Seq[Seq[int]], kv_hook: KVHook | None = None
    ) -> StepInputs:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu_seqlens = [0]
        kv_lens: list[int] = []
        for chunk, table in zip(chunks, tables):
            span = range(chunk.start, chunk.start + chunk.num_tokens)
            input_ids.extend(chunk.seq.token_at(p) for p in span)
            positions.extend(span)
            slots.extend(slots_for(table, chunk.start, chunk.num_tokens, self.block_size))
            cu_seqlens.append(cu_seqlens[-1] + chunk.num_tokens)
            kv_lens.append(chunk.start + chunk.num_tokens)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            cu_seqlens_q=torch.tensor(cu_seqlens, dtype=torch.int32, device=dev),
            kv_lens=torch.tensor(kv_lens, dtype=torch.int32, device=dev),
            block_tables=block_tables_tensor(tables, dev),
            is_decode=all(c.num_tokens == 1 for c in chunks),
            kv_hook=kv_hook,
        )
        sample_rows = [cu_seqlens[i + 1] - 1 for i, c in enumerate(chunks) if c.samples]
        return StepInputs(
            input_ids=torch.tensor(input_ids, dtype=torch.int64, device=dev),
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            meta=meta,
            sample_rows=torch.tensor(sample_rows, dtype=torch.int64, device=dev),
        )

    @torch.inference_mode()
    def forward_logits(self, inputs: StepInputs) -> torch.Tensor:
        """Logits [S, V] (fp32) at the sampled rows."""
        if self.graphs is not None and self.graphs.can_replay(inputs.meta):
            hidden = self.graphs.replay(inputs.input_ids, inputs.positions, inputs.meta)
        else:
            with forward_context(inputs.meta):
                hidden = self.model(inputs.input_ids, inputs.positions)
        return self.model.compute_logits(hidden[inputs.sample_rows])

    @torch.inference_mode()
    def execute(
        self, out: SchedulerOutput, tables: Seq[Seq[int]], kv_hook: KVHook | None = None
    ) -> SampledTokens:
        inputs = self.prepare(out.chunks, tables, kv_hook)
        logits = self.forward_logits(inputs)
        sampling = [c.seq for c in out.chunks if c.samples]
        if not sampling:
            return SampledTokens([], None)
        batch = SamplingBatch.build(
            [s.sampling for s in sampling],
            seeds=[s.seed for s in sampling],
            steps=[len(s.output_token_ids) for s in sampling],
            device=self.device,
        )
        result = sample(logits, batch)
        logprobs = result.logprobs.tolist() if result.logprobs is not None else None
        return SampledTokens(result.token_ids.tolist(), logprobs)
