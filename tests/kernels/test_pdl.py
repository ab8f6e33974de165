"""Programmatic dependent launch: which launches take it, and that a one-row decode layer's kernels chained
with it in a CUDA graph compute exactly what they compute as plain stream-ordered launches."""

from __future__ import annotations

import pytest
import torch

from diptych.engine.rope import cos_sin_cache
from diptych.kernels import ops
from diptych.kernels.dispatch import PDL_MAX_ROWS, use_pdl
from tests.kernels.helpers import Target, make_paged_kv

needs_hopper = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
    reason="needs a CUDA GPU of compute capability 9.0 or newer",
)


def test_cpu_tensors_never_take_it() -> None:
    assert not use_pdl(torch.zeros(1, 8))


@pytest.mark.gpu
@needs_hopper
def test_one_row_cuda_launches_take_it_unless_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DIPTYCH_PDL", raising=False)
    assert use_pdl(torch.zeros(PDL_MAX_ROWS, 8, device="cuda"))
    assert not use_pdl(torch.zeros(PDL_MAX_ROWS + 1, 8, device="cuda"))
    monkeypatch.setenv("DIPTYCH_PDL", "0")
    assert not use_pdl(torch.zeros(PDL_MAX_ROWS, 8, device="cuda"))


HIDDEN, Q_HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE = 2048, 16, 4, 128, 8192
CONTEXT, BLOCK_SIZE = 3000, 16


def one_row_layer(weights: dict[str, torch.Tensor], kv: dict[str, torch.Tensor]) -> torch.Tensor:
    """A Llama decoder layer at one token, through the ops that launch with PDL at one row; every kernel
    reads what the one before it wrote."""
    x, eps = kv["x"], 1e-5
    normed = ops.rms_norm(x, weights["norm1"], eps)
    q, k, v = ops.skinny_linear(normed, weights["qkv"]).split(
        [Q_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1
    )
    q = q.view(1, Q_HEADS, HEAD_DIM)
    k, v = k.view(1, KV_HEADS, HEAD_DIM), v.view(1, KV_HEADS, HEAD_DIM)
    caches = kv["k_cache"], kv["v_cache"]
    ops.rope_and_store_kv(q, k, v, kv["position"], kv["cos_sin"], *caches, kv["slot"])
    attended, _ = ops.decode_attention(q, *caches, kv["kv_lens"], kv["block_tables"], HEAD_DIM**-0.5)
    out = ops.skinny_linear(attended.view(1, -1), weights["o"])
    normed, residual = ops.fused_add_rms_norm(out, x, weights["norm2"], eps)
    gated = ops.skinny_linear(normed, weights["gate_up"], fuse_silu=True)
    return ops.skinny_linear(gated, weights["down"]) + residual


@pytest.mark.gpu
@needs_hopper
def test_a_graph_of_pdl_launches_equals_plain_launches(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to("cuda", torch.bfloat16)

    weights = {
        "norm1": rand(HIDDEN),
        "norm2": rand(HIDDEN),
        "qkv": rand((Q_HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN, scale=HIDDEN**-0.5),
        "o": rand(HIDDEN, Q_HEADS * HEAD_DIM, scale=HIDDEN**-0.5),
        "gate_up": rand(2 * INTERMEDIATE, HIDDEN, scale=HIDDEN**-0.5),
        "down": rand(HIDDEN, INTERMEDIATE, scale=INTERMEDIATE**-0.5),
    }
    paged = make_paged_kv([CONTEXT], KV_HEADS, HEAD_DIM, BLOCK_SIZE, Target("cuda", torch.bfloat16, 0, 0))
    last_block = int(paged.block_tables[0, (CONTEXT - 1) // BLOCK_SIZE])
    kv = {
        "x": rand(1, HIDDEN),
        "position": torch.tensor([CONTEXT - 1], device="cuda"),
        "slot": torch.tensor([last_block * BLOCK_SIZE + (CONTEXT - 1) % BLOCK_SIZE], device="cuda"),
        "cos_sin": cos_sin_cache(HEAD_DIM, CONTEXT, 500000.0, None, torch.device("cuda")),
        "k_cache": paged.k_cache,
        "v_cache": paged.v_cache,
        "kv_lens": paged.kv_lens,
        "block_tables": paged.block_tables,
    }
    monkeypatch.setenv("DIPTYCH_PDL", "0")
    with torch.inference_mode():
        plain = one_row_layer(weights, kv)
    monkeypatch.setenv("DIPTYCH_PDL", "1")
    assert use_pdl(kv["x"])
    with torch.inference_mode():
        one_row_layer(weights, kv)  # compiles the PDL variants outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = one_row_layer(weights, kv)
        for _ in range(20):  # a missing wait would show as a race, not necessarily on the first replay
            captured.zero_()
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(captured, plain)
    assert plain.abs().max().item() > 0  # a layer that computed nothing would match too
