"""Llama-family decoder (Llama 2/3, Mistral, Qwen2-style QKV bias, SmolLM2) over a flat token batch.

One forward takes the tokens of many sequences back to back (no padding) with their positions; K/V go
into the paged cache through the slot mapping and attention reads through block tables, by the step's
attention backend (engine/attention.py). Prefill chunks and decode steps are the same call with different
AttentionMetadata. A stage of a pipeline runs a range of the layers (LlamaModel.forward_layers).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from diptych.engine.attention import PAGED_BACKEND
from diptych.engine.config import ModelConfig
from diptych.engine.forward_context import get_attention_metadata
from diptych.engine.linear import Linear
from diptych.engine.rope import cos_sin_cache
from diptych.kernels import ops
from diptych.kernels.quantized_linear import QuantizedWeight
from diptych.kernels.skinny_linear import use_skinny


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps), x
        return ops.fused_add_rms_norm(x, residual, self.weight, self.eps)


class PagedAttention(nn.Module):
    """A layer's attention through the step's backend: rotates q and k, writes K/V into the paged cache,
    then attends through the block tables."""

    def __init__(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.scale = head_dim**-0.5
        self.k_cache = torch.empty(0)  # bound by PagedKVCache.bind()
        self.v_cache = torch.empty(0)

    def forward(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos_sin: torch.Tensor,
    ) -> torch.Tensor:
        meta = get_attention_metadata()
        backend = meta.backend or PAGED_BACKEND
        return backend.forward(self, q, k, v, positions, cos_sin, meta).out


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        c = config
        self.qkv_proj = Linear(c.hidden_size, c.q_size + 2 * c.kv_size, bias=c.qkv_bias)
        self.o_proj = Linear(c.q_size, c.hidden_size, bias=False)
        self.attn = PagedAttention(layer_idx, c.num_heads, c.num_kv_heads, c.head_dim)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
        c = self.config
        q, k, v = self.qkv_proj(x).split([c.q_size, c.kv_size, c.kv_size], dim=-1)
        q = q.view(-1, c.num_heads, c.head_dim)
        k = k.view(-1, c.num_kv_heads, c.head_dim)
        v = v.view(-1, c.num_kv_heads, c.head_dim)
        return self.o_proj(self.attn(positions, q, k, v, cos_sin).reshape(-1, c.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj
        if gate_up.bias is None and use_skinny(x, gate_up.weight):
            # One kernel for the projection and the SwiGLU gate: the [T, 2I] product never reaches HBM.
            return self.down_proj(ops.skinny_linear(x, gate_up.weight, fuse_silu=True))
        return self.down_proj(ops.silu_and_mul(gate_up(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        cos_sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, cos_sin)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


@dataclass(frozen=True)
class LayerRange:
    """Decoder layers [start, end) that one stage runs: the first stage (start 0) embeds the input ids, the
    last (end = the model's layer count) applies the final norm."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"layer range [{self.start}, {self.end}) must hold a layer from 0 up")

    def check(self, num_layers: int) -> None:
        if self.end > num_layers:
            raise ValueError(
                f"layer range [{self.start}, {self.end}) is past the model's {num_layers} layers"
            )


@dataclass(frozen=True)
class StageOutput:
    """What a stage hands on: the hidden states [T, hidden] and the residual stream to add to them, or,
    from the last stage, the final-normed hidden states (for the logits) and no residual."""

    hidden: torch.Tensor
    residual: torch.Tensor | None


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.all_layers = LayerRange(0, config.num_layers)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
    ) -> torch.Tensor:
        return self.forward_layers(positions, cos_sin, self.all_layers, input_ids=input_ids).hidden

    def forward_layers(
        self,
        positions: torch.Tensor,
        cos_sin: torch.Tensor,
        layers: LayerRange,
        input_ids: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
    ) -> StageOutput:
        """Run layers [layers.start, layers.end): from the input ids [T] for the first stage, else from the
        previous stage's hidden and residual [T, hidden]. Each layer keeps its model-wide index, so the KV
        cache and the KV hook see the same layer whichever stage runs it."""
        layers.check(len(self.layers))
        if layers.start == 0:
            if input_ids is None or hidden is not None or residual is not None:
                raise ValueError("the first stage (layer 0) takes input_ids, and no hidden or residual")
            hidden = self.embed_tokens(input_ids)
        elif input_ids is not None or hidden is None or residual is None:
            raise ValueError(f"a stage from layer {layers.start} takes hidden and residual, not input_ids")
        for layer in itertools.islice(self.layers, layers.start, layers.end):
            hidden, residual = layer(positions, hidden, residual, cos_sin)
        if layers.end < len(self.layers):
            return StageOutput(hidden, residual)
        return StageOutput(self.norm(hidden, residual)[0], None)


# HF checkpoint name suffix -> (our fused parameter, which shard of it).
_FUSED_SHARDS = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.cos_sin = torch.empty(0)  # set by build_model on the model's device

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions, self.cos_sin)

    def forward_layers(
        self,
        positions: torch.Tensor,
        layers: LayerRange,
        input_ids: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
    ) -> StageOutput:
        """LlamaModel.forward_layers with the model's RoPE table; compute_logits takes the last stage's."""
        return self.model.forward_layers(positions, self.cos_sin, layers, input_ids, hidden, residual)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def shard_offsets(self, fused: str, shard: int) -> tuple[int, int]:
        c = self.config
        sizes = [c.q_size, c.kv_size, c.kv_size] if fused.endswith("qkv_proj") else [c.intermediate_size] * 2
        start = sum(sizes[:shard])
        return start, sizes[shard]

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors in; every parameter must be covered exactly once."""
        params = dict(self.named_parameters())
        missing = {name: self._rows(p) for name, p in params.items()}
        for name, tensor in weights:
            target, rows = self._target(name)
            if target not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no place in {self.config.architecture}")
            param = params[target]
            dest = param if rows is None else param.narrow(0, rows[0], rows[1])
            if dest.shape != tensor.shape:
                raise ValueError(
                    f"{name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(dest.shape)}"
                )
            dest.copy_(tensor)
            missing[target] -= dest.shape[0] if param.dim() else 1
        unfilled = sorted(name for name, left in missing.items() if left > 0)
        if unfilled:
            raise ValueError(f"checkpoint lacks weights for: {', '.join(unfilled[:6])}")

    def attach_quantized_weights(self, weights: Iterable[tuple[str, QuantizedWeight]]) -> None:
        """Give each Linear whose weight the checkpoint also stores quantized (all of its rows, fused
        projections included, in one code width) that copy, named as for load_weights and equal to the
        loaded weight."""
        params = dict(self.named_parameters())
        owners = {id(m.weight): m for m in self.modules() if isinstance(m, Linear)}
        parts: dict[int, list[tuple[int, QuantizedWeight]]] = {}
        for name, weight in weights:
            target, rows = self._target(name)
            param = params.get(target)
            if param is not None and id(param) in owners:
                parts.setdefault(id(param), []).append((0 if rows is None else rows[0], weight))
        for key, pieces in parts.items():
            layer = owners[key]
            pieces.sort(key=lambda piece: piece[0])
            if (
                sum(w.shape[0] for _, w in pieces) != layer.out_features
                or len({w.bits for _, w in pieces}) > 1
            ):
                continue  # some rows are stored unquantized, or in two code widths: the layer stays dense
            layer.attach_quantized(QuantizedWeight.cat([w for _, w in pieces]))

    def _target(self, name: str) -> tuple[str, tuple[int, int] | None]:
        if self.config.tie_word_embeddings and name == "lm_head.weight":
            name = "model.embed_tokens.weight"
        for hf, (fused, shard) in _FUSED_SHARDS.items():
            if f".{hf}." in name:
                target = name.replace(hf, fused)
                return target, self.shard_offsets(fused, shard)
        return name, None

    @staticmethod
    def _rows(p: torch.Tensor) -> int:
        return p.shape[0] if p.dim() else 1


def build_model(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    """An uninitialised model on its device (weights are loaded or randomised next), RoPE table in fp32."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device=device)
    model.tie_weights()  # to_empty makes new parameters, which unties them
    model.cos_sin = cos_sin_cache(
        config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling, device
    )
    return model


@torch.no_grad()
def init_random_weights(model: nn.Module, seed: int = 0) -> None:
    """Small random values for benchmarks: the cost of a forward does not depend on them."""
    for i, (name, param) in enumerate(model.named_parameters()):
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            gen = torch.Generator(device=param.device).manual_seed(seed + i)
            param.normal_(0.0, 0.02, generator=gen)
