"""The kernel entry points: each dispatches to its Triton kernel (CUDA) or torch reference (CPU)."""

from diptych.kernels.activation import silu_and_mul
from diptych.kernels.decode_attention import decode_attention
from diptych.kernels.kv_cache_write import store_kv_cache
from diptych.kernels.merge_attn_states import merge_attn_states
from diptych.kernels.prefill_attention import prefill_attention
from diptych.kernels.quantized_linear import quantized_linear
from diptych.kernels.rms_norm import fused_add_rms_norm, rms_norm
from diptych.kernels.rope import apply_rope
from diptych.kernels.rope_store_kv import rope_and_store_kv
from diptych.kernels.skinny_linear import skinny_linear

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
