"""RoPE in place on q/k views of a fused qkv buffer: kernel vs reference, reference vs HF (Llama-3 scaled)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from diptych.kernels.rope import apply_rope_reference, apply_rope_triton
from tests.kernels.helpers import Target

MAX_POSITIONS = 512


def hf_rotary(head_dim: int) -> LlamaRotaryEmbedding:
    scaling = dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0
    )
    config = LlamaConfig(
        hidden_size=4 * head_dim,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=MAX_POSITIONS,
        rope_parameters=dict(scaling, original_max_position_embeddings=64),
    )
    return LlamaRotaryEmbedding(config)


def cos_sin_cache(rotary: LlamaRotaryEmbedding, device: str) -> torch.Tensor:
    freqs = torch.outer(torch.arange(MAX_POSITIONS, dtype=torch.float32), rotary.inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)


def fused_qkv(tokens: int, q_heads: int, k_heads: int, head_dim: int, target: Target) -> torch.Tensor:
    return torch.randn(tokens, (q_heads + 2 * k_heads) * head_dim, device=target.device).to(target.dtype)


def split(qkv: torch.Tensor, q_heads: int, k_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    q = qkv[:, : q_heads * head_dim].view(-1, q_heads, head_dim)
    k = qkv[:, q_heads * head_dim : (q_heads + k_heads) * head_dim].view(-1, k_heads, head_dim)
    return q, k


def test_reference_matches_hf_llama3() -> None:
    tokens, q_heads, k_heads, head_dim = 9, 4, 2, 32
    rotary = hf_rotary(head_dim)
    positions = torch.randint(0, MAX_POSITIONS, (tokens,))
    qkv = fused_qkv(tokens, q_heads, k_heads, head_dim, Target("cpu", torch.float32, 0, 0))
    q0, k0 = (t.clone() for t in split(qkv, q_heads, k_heads, head_dim))
    q, k = split(qkv, q_heads, k_heads, head_dim)
    apply_rope_reference(q, k, positions, cos_sin_cache(rotary, "cpu"))

    cos, sin = rotary(q0, positions[None, :])  # [1, T, D]
    # HF layout is [batch, heads, T, D].
    hf_q, hf_k = apply_rotary_pos_emb(q0.transpose(0, 1)[None], k0.transpose(0, 1)[None], cos, sin)
    torch.testing.assert_close(q, hf_q[0].transpose(0, 1))
    torch.testing.assert_close(k, hf_k[0].transpose(0, 1))


def check_kernel(tokens: int, q_heads: int, k_heads: int, head_dim: int, target: Target) -> None:
    cache = cos_sin_cache(hf_rotary(head_dim), target.device)
    positions = torch.randint(0, MAX_POSITIONS, (tokens,), device=target.device)
    qkv = fused_qkv(tokens, q_heads, k_heads, head_dim, target)
    expected = qkv.clone()
    apply_rope_triton(*split(qkv, q_heads, k_heads, head_dim), positions, cache)
    apply_rope_reference(*split(expected, q_heads, k_heads, head_dim), positions, cache)
    # Covers the V columns too: the kernel must leave them untouched.
    torch.testing.assert_close(qkv, expected, atol=target.atol, rtol=target.rtol)


@pytest.mark.parametrize(("q_heads", "k_heads", "head_dim"), [(4, 4, 16), (9, 3, 64), (8, 1, 32)])
def test_kernel_matches_reference(target: Target, q_heads: int, k_heads: int, head_dim: int) -> None:
    check_kernel(6, q_heads, k_heads, head_dim, target)


def test_kernel_real_shapes(gpu_target: Target) -> None:
    check_kernel(4096, 32, 8, 128, gpu_target)
