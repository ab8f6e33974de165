"""LSE merge: two partial attentions over disjoint key sets merge to attention over all of them."""

from __future__ import annotations

import pytest
import torch

from diptych.kernels.decode_attention import decode_attention_reference, decode_attention_triton
from diptych.kernels.merge_attn_states import merge_attn_states_reference, merge_attn_states_triton
from tests.kernels.helpers import Target, make_paged_kv, naive_attention, paged_from_dense

pytestmark = pytest.mark.usefixtures("poison_empty")
MERGES = [merge_attn_states_triton, merge_attn_states_reference]


def partial_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [1, H, D] over all given keys; an empty key set gives out 0 and lse -inf."""
    if keys.shape[0] == 0:
        return torch.zeros_like(q, dtype=torch.float64), torch.full(
            q.shape[:2], float("-inf"), dtype=torch.float64
        )
    return naive_attention(q, keys, values, torch.tensor([keys.shape[0]]), 0.25)


@pytest.mark.parametrize("merge", MERGES)
def test_merge_of_halves_equals_whole(target: Target, merge: object) -> None:
    gen = torch.Generator().manual_seed(0)
    heads, head_dim = 4, 24
    rows_a: list[torch.Tensor] = []
    rows_b: list[torch.Tensor] = []
    lses_a: list[torch.Tensor] = []
    lses_b: list[torch.Tensor] = []
    wholes: list[torch.Tensor] = []
    whole_lses: list[torch.Tensor] = []
    # Row 0: side a is empty; row 1: no keys at all; the rest: random disjoint splits.
    for length in [9, 0, 20, 3, 31]:
        q = torch.randn(1, heads, head_dim, generator=gen)
        keys, values = (
            torch.randn(length, heads, head_dim, generator=gen),
            torch.randn(length, heads, head_dim, generator=gen),
        )
        in_a = torch.rand(length, generator=gen) < 0.5
        if len(rows_a) == 0:
            in_a[:] = False
        for side, rows, lses in ((in_a, rows_a, lses_a), (~in_a, rows_b, lses_b)):
            out, lse = partial_attention(q, keys[side], values[side])
            rows.append(out)
            lses.append(lse)
        out, lse = partial_attention(q, keys, values)
        wholes.append(out)
        whole_lses.append(lse)

    def stack(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return torch.cat(parts).to(device=target.device, dtype=dtype)

    out, lse = merge(  # type: ignore[operator]
        stack(rows_a, target.dtype),
        stack(lses_a, torch.float32),
        stack(rows_b, target.dtype),
        stack(lses_b, torch.float32),
    )
    assert out.dtype == target.dtype
    torch.testing.assert_close(out.float(), stack(wholes, torch.float32), atol=target.atol, rtol=target.rtol)
    torch.testing.assert_close(lse, stack(whole_lses, torch.float32), atol=target.atol, rtol=target.rtol)


def test_decode_shards_merge_to_whole(target: Target) -> None:
    """Decode context parallelism: token t of each sequence on shard t % 2; merged shards equal the whole."""
    paged = make_paged_kv([40, 1, 0, 17], 2, 32, 8, target)
    shards = [
        paged_from_dense(
            [k[shard::2] for k in paged.keys], [v[shard::2] for v in paged.values], 8, target, shard
        )
        for shard in (0, 1)
    ]
    q = torch.randn(4, 8, 32, device=target.device).to(target.dtype)
    partials = [
        decode_attention_triton(q, s.k_cache, s.v_cache, s.kv_lens, s.block_tables, 0.2, 2) for s in shards
    ]
    out, lse = merge_attn_states_triton(*partials[0], *partials[1])
    expected, expected_lse = decode_attention_reference(
        q.float(), paged.k_cache.float(), paged.v_cache.float(), paged.kv_lens, paged.block_tables, 0.2
    )
    torch.testing.assert_close(out.float(), expected, atol=target.atol, rtol=target.rtol)
    torch.testing.assert_close(lse, expected_lse, atol=target.atol, rtol=target.rtol)
