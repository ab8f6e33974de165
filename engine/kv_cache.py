"""The paged KV cache tensors: per layer K and V of shape [num_blocks, block_size, kv_heads, head_dim]."""

from __future__ import annotations

import torch
from torch import nn

from diptych.engine.config import ModelConfig
from diptych.engine.model import PagedAttention

GIB = 1 << 30


def kv_block_bytes(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return config.kv_bytes_per_token(dtype.itemsize) * block_size


def kv_budget_bytes(device: torch.device, cpu_gib: float, gpu_fraction: float) -> int:
    """How much memory the cache may take: a fixed GiB budget on CPU, a fraction of what is free on CUDA."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * gpu_fraction)
    return int(cpu_gib * GIB)


class PagedKVCache:
    def __init__(
        self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        if num_blocks < 1:
            raise ValueError(
                f"the KV memory budget holds no block of {block_size} tokens "
                f"({kv_block_bytes(config, block_size, dtype)} bytes each): raise it"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (2, config.num_layers, num_blocks, block_size, config.num_kv_heads, config.head_dim)
        self.storage = torch.zeros(shape, dtype=dtype, device=device)

    @classmethod
    def from_budget(
        cls, config: ModelConfig, budget_bytes: int, block_size: int, dtype: torch.dtype, device: torch.device
    ) -> PagedKVCache:
        return cls(
            config, budget_bytes // kv_block_bytes(config, block_size, dtype), block_size, dtype, device
        )

    def key(self, layer: int) -> torch.Tensor:
        return self.storage[0, layer]

    def value(self, layer: int) -> torch.Tensor:
        return self.storage[1, layer]

    def bind(self, model: nn.Module) -> None:
        """Point every attention layer of the model at its slice of the cache."""
        layers = [m for m in model.modules() if isinstance(m, PagedAttention)]
        for attn in layers:
            attn.k_cache = self.key(attn.layer_idx)
            attn.v_cache = self.value(attn.layer_idx)
