"""Factories for model-level tests without an engine: a tiny random model bound to its own paged cache, and
the tensors of one forward step (prefill chunks or decode rows) built by hand."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from diptych.engine.config import ModelConfig
from diptych.engine.forward_context import AttentionMetadata
from diptych.engine.kv_cache import PagedKVCache
from diptych.engine.model import LlamaForCausalLM, build_model, init_random_weights

CPU = torch.device("cpu")


@dataclass(frozen=True)
class TinyModel:
    model: LlamaForCausalLM
    cache: PagedKVCache
    tables: torch.Tensor  # [max_seqs, blocks per sequence] int32: sequence b's blocks, shuffled

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size


def make_tiny_model(
    num_layers: int = 4, seed: int = 0, block_size: int = 4, max_seqs: int = 4, max_len: int = 64
) -> TinyModel:
    """fp32 on CPU, weights large enough that logits vary a lot from token to token."""
    config = ModelConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_layers=num_layers,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=256,
    )
    model = build_model(config, torch.float32, CPU)
    init_random_weights(model, seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.endswith("norm.weight"):
                param.mul_(5.0)  # std 0.1
    per_seq = -(-max_len // block_size)
    cache = PagedKVCache(config, max_seqs * per_seq, block_size, torch.float32, CPU)
    cache.bind(model)
    order = torch.randperm(max_seqs * per_seq, generator=torch.Generator().manual_seed(seed))
    return TinyModel(model, cache, order.view(max_seqs, per_seq).to(torch.int32))


@dataclass(frozen=True)
class Step:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata


def make_step(tiny: TinyModel, chunks: list[tuple[list[int], int]], **meta_fields: Any) -> Step:
    """One forward over chunks[b] = (token ids, position of the first) of sequence b (its first position is
    also how many of its tokens are cached already). A decode step when every chunk is one token."""
    block_size = tiny.cache.block_size
    tables = tiny.tables[: len(chunks)]
    ids = [t for tokens, _ in chunks for t in tokens]
    positions = [start + i for tokens, start in chunks for i in range(len(tokens))]
    seq_of = [b for b, (tokens, _) in enumerate(chunks) for _ in tokens]
    slots = [int(tables[b, p // block_size]) * block_size + p % block_size for b, p in zip(seq_of, positions)]
    bounds = [0]
    for tokens, _ in chunks:
        bounds.append(bounds[-1] + len(tokens))
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        cu_seqlens_q=torch.tensor(bounds, dtype=torch.int32),
        kv_lens=torch.tensor([start + len(tokens) for tokens, start in chunks], dtype=torch.int32),
        block_tables=tables,
        is_decode=all(len(tokens) == 1 for tokens, _ in chunks),
        **meta_fields,
    )
    return Step(torch.tensor(ids, dtype=torch.int64), torch.tensor(positions, dtype=torch.int64), meta)


def random_prompts(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]
