"""GGUF files: the model shape from the metadata, the weights dequantized and renamed to HF Llama names.

Problems with the file raise ValueError; `engine.loader` adds the path and turns them into ModelLoadError.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize

from diptych.engine.config import ModelConfig, RopeScaling
from diptych.kernels.quantized_linear import BLOCK, QuantizedWeight

_Q = GGMLQuantizationType
# Types whose dequantization the tests check against an independent numpy reference.
SUPPORTED_TYPES = frozenset({_Q.F32, _Q.F16, _Q.BF16, _Q.Q8_0, _Q.Q4_0, _Q.Q4_1, _Q.Q5_0, _Q.Q5_1})

# llama.cpp tensor names -> HF transformers Llama names; "{i}" is the layer index.
NAME_TABLE = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
# Llama-3 RoPE scaling stored as per-frequency divisors: read into ModelConfig.rope_scaling, not a parameter.
ROPE_FREQS = "rope_freqs.weight"
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


@dataclass(frozen=True)
class _Arch:
    hf_architecture: str
    permuted_qk: bool  # llama.cpp's converter permutes Q/K rows for its rotary layout only for "llama"


ARCHITECTURES = {
    "llama": _Arch("LlamaForCausalLM", permuted_qk=True),
    "qwen2": _Arch("Qwen2ForCausalLM", permuted_qk=False),
}


@functools.lru_cache(maxsize=4)
def open_gguf(path: Path) -> GGUFReader:
    """Parse a file once per process: the token list alone makes GGUFReader take seconds."""
    try:
        return GGUFReader(path)
    except Exception as e:  # the parser fails with whatever numpy raises on a bad or truncated file
        raise ValueError(f"not a readable GGUF file ({type(e).__name__}: {e})") from None


def load_config(path: Path) -> ModelConfig:
    reader = open_gguf(path)
    arch_name = str(_required(reader, "general.architecture"))
    arch = _architecture(arch_name)
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError("GGUF file has no token_embd.weight tensor")

    def key(name: str) -> Any:
        return _required(reader, f"{arch_name}.{name}")

    hidden, num_heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(_optional(reader, f"{arch_name}.attention.key_length") or hidden // num_heads)
    rope_theta = float(_optional(reader, f"{arch_name}.rope.freq_base") or 10000.0)
    eos = (_optional(reader, "tokenizer.ggml.eos_token_id"), _optional(reader, "tokenizer.ggml.eot_token_id"))
    return ModelConfig(
        # The embedding's rows are what the weights hold; a token list may be shorter than that.
        vocab_size=_shape(tensors["token_embd.weight"])[0],
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=int(key("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(_optional(reader, f"{arch_name}.attention.head_count_kv") or num_heads),
        head_dim=head_dim,
        max_position_embeddings=int(key("context_length")),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        rope_theta=rope_theta,
        rope_scaling=_rope_scaling(reader, arch_name, tensors.get(ROPE_FREQS), rope_theta, head_dim),
        tie_word_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        architecture=arch.hf_architecture,
        bos_token_id=_optional(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(int(i) for i in eos if i is not None)),
    )


def open_weights(path: Path, config: ModelConfig) -> tuple[int, Iterator[tuple[str, torch.Tensor]]]:
    """(tensor count, float32 tensors under HF names); every tensor's type is checked before any is read."""
    reader = open_gguf(path)
    tensors = [t for t in reader.tensors if t.name != ROPE_FREQS]
    for t in tensors:
        if t.tensor_type not in SUPPORTED_TYPES:
            supported = ", ".join(sorted(q.name for q in SUPPORTED_TYPES))
            raise ValueError(f"tensor {t.name!r} has type {t.tensor_type.name}; supported types: {supported}")
    arch = _architecture(str(_required(reader, "general.architecture")))
    return len(tensors), (_convert(t, config, arch) for t in tensors)


# Types whose blocks the CPU can multiply without dequantizing (kernels/quantized_linear.py): bytes per block.
QUANTIZED_KERNEL_TYPES = {_Q.Q4_0: 18, _Q.Q4_1: 20, _Q.Q8_0: 34}
_LINEAR_WEIGHTS = re.compile(
    r"blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down))\.weight|output\.weight|token_embd\.weight"
)


def open_quantized_weights(path: Path, config: ModelConfig) -> Iterator[tuple[str, QuantizedWeight]]:
    """The projection weights (and the output head or the tied embedding) stored in a block type the
    quantized kernel takes, under HF names, still quantized; Q/K rows unpermuted like the dense ones."""
    reader = open_gguf(path)
    arch = _architecture(str(_required(reader, "general.architecture")))
    for t in reader.tensors:
        if t.tensor_type in QUANTIZED_KERNEL_TYPES and _LINEAR_WEIGHTS.fullmatch(t.name):
            name = hf_name(t.name)
            yield name, _unpermuted(quantized_blocks(t), name, config, arch)


def quantized_blocks(t: ReaderTensor) -> QuantizedWeight:
    """A Q4_0, Q4_1 or Q8_0 tensor's blocks, split into codes and fp32 scales (and offsets)."""
    rows, cols = _shape(t)
    if cols % BLOCK:
        raise ValueError(f"tensor {t.name!r}: {cols} columns is not a whole number of {BLOCK}-weight blocks")
    return split_blocks(np.asarray(t.data), t.tensor_type, rows, cols)


def split_blocks(data: np.ndarray, qtype: GGMLQuantizationType, rows: int, cols: int) -> QuantizedWeight:
    """Raw Q4_0 / Q4_1 / Q8_0 blocks (fp16 scale, [fp16 min,] codes) of a [rows, cols] weight.

    Q4_0's weight d * (q - 8) becomes offset -8 d: d * q is exact in fp32, and so is d * q - 8 d, which
    equals d * (q - 8), so the weights stay equal to gguf-py's."""
    raw = (
        np.ascontiguousarray(data).view(np.uint8).reshape(rows, cols // BLOCK, QUANTIZED_KERNEL_TYPES[qtype])
    )

    def fp16_field(at: int) -> torch.Tensor:
        return torch.from_numpy(raw[..., at : at + 2].copy().view(np.float16)[..., 0].astype(np.float32))

    scales = fp16_field(0)
    if qtype == _Q.Q8_0:
        return QuantizedWeight(8, torch.from_numpy(raw[..., 2:].copy()), scales, None)
    if qtype == _Q.Q4_1:
        return QuantizedWeight(4, torch.from_numpy(raw[..., 4:].copy()), scales, fp16_field(2))
    return QuantizedWeight(4, torch.from_numpy(raw[..., 2:].copy()), scales, -8.0 * scales)


def _unpermuted(w: QuantizedWeight, name: str, config: ModelConfig, arch: _Arch) -> QuantizedWeight:
    heads = _permuted_heads(name, config, arch)
    if heads is None:
        return w

    def rows(a: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(unpermute(a.numpy(), heads)))

    return QuantizedWeight(
        w.bits, rows(w.codes), rows(w.scales), None if w.offsets is None else rows(w.offsets)
    )


def _permuted_heads(name: str, config: ModelConfig, arch: _Arch) -> int | None:
    """The head count whose rows llama.cpp permuted in this tensor, or None if it did not."""
    if arch.permuted_qk and ".self_attn.q_proj." in name:
        return config.num_heads
    if arch.permuted_qk and ".self_attn.k_proj." in name:
        return config.num_kv_heads
    return None


def hf_name(gguf_name: str) -> str:
    block = _BLOCK.fullmatch(gguf_name)
    key = f"blk.{{i}}.{block[2]}" if block else gguf_name
    if key not in NAME_TABLE:
        raise ValueError(f"unexpected tensor {gguf_name!r} in GGUF file")
    return NAME_TABLE[key].format(i=block[1] if block else "")


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (it interleaves the two rotary halves of every head)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _convert(t: ReaderTensor, config: ModelConfig, arch: _Arch) -> tuple[str, torch.Tensor]:
    name = hf_name(t.name)
    w = dequantize(t.data, t.tensor_type).reshape(_shape(t))
    heads = _permuted_heads(name, config, arch)
    if heads is not None:
        w = unpermute(w, heads)
    # F32 data comes back as a read-only view of the memory-mapped file; torch wants its own copy.
    return name, torch.from_numpy(w if w.flags.writeable else w.copy())


def _shape(t: ReaderTensor) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(t.shape))  # GGML lists dimensions innermost first


def _architecture(name: str) -> _Arch:
    if name not in ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {name!r}; supported: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def _optional(reader: GGUFReader, key: str) -> Any:
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _required(reader: GGUFReader, key: str) -> Any:
    value = _optional(reader, key)
    if value is None:
        raise ValueError(f"GGUF metadata lacks {key!r}")
    return value


def _rope_scaling(
    reader: GGUFReader, arch: str, freqs: ReaderTensor | None, theta: float, head_dim: int
) -> RopeScaling | None:
    kind = _optional(reader, f"{arch}.rope.scaling.type")
    if kind not in (None, "none"):
        raise ValueError(f"unsupported RoPE scaling type {kind!r} in GGUF metadata")
    if freqs is None:
        return None
    return llama3_scaling_from_factors(dequantize(freqs.data, freqs.tensor_type).ravel(), theta, head_dim)


def llama3_scaling_from_factors(factors: np.ndarray, theta: float, head_dim: int) -> RopeScaling | None:
    """Recover Llama-3 scaling from llama.cpp's per-frequency divisors (its converter keeps only those).

    A divisor is 1 for short wavelengths, `factor` for long ones, and 1 / ((1 - s) / factor + s) between,
    with s = a / wavelength - b linear in 1 / wavelength. The divisors fix only a and b, so low_freq_factor
    is taken as 1; any choice gives the same frequencies.
    """
    factor = float(factors.max())
    if factor <= 1.0:
        return None
    inv_wavelen = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim) / (2 * math.pi)
    between = (factors > 1.0 + 1e-6) & (factors < factor * (1 - 1e-6))
    if between.sum() < 2:
        raise ValueError(
            f"cannot recover Llama-3 RoPE scaling from {ROPE_FREQS} (too few smoothed frequencies)"
        )
    smooth = (factor / factors[between].astype(np.float64) - 1.0) / (factor - 1.0)
    a, minus_b = np.polyfit(inv_wavelen[between], smooth, 1)
    b = -minus_b
    original = round(a / b)  # with low_freq_factor 1: a / b = original context length
    low = original * b / a
    return RopeScaling(
        factor=factor,
        low_freq_factor=float(low),
        high_freq_factor=float(low + original / a),
        original_max_position_embeddings=original,
    )
