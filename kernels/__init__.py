"""Triton kernels, one op per file, each with a plain torch reference; the functions below dispatch."""

from kernels.activation import silu_and_mul
from kernels.decode_attention import decode_attention
from kernels.kv_cache_write import store_kv_cache
from kernels.merge_attn_states import merge_attn_states
from kernels.prefill_attention import prefill_attention
from kernels.quantized_linear import quantized_linear
from kernels.rms_norm import fused_add_rms_norm, rms_norm
from kernels.rope import apply_rope
from kernels.rope_store_kv import rope_and_store_kv
from kernels.skinny_linear import skinny_linear

__all__ = [
    "apply_rope",
    "decode_attention",
    "fused_add_rms_norm",
    "merge_attn_states",
    "prefill_attention",
    "quantized_linear",
    "rms_norm",
    "rope_and_store_kv",
    "silu_and_mul",
    "skinny_linear",
    "store_kv_cache",
]
