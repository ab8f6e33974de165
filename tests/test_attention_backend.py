"""Attention behind a backend: the paged backend does what the ops did, returns the LSE, and the backend on
a step's metadata is the one the model calls."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest
import torch

from diptych.engine.attention import (
    PAGED_BACKEND,
    AttentionBackend,
    AttentionLayer,
    AttentionOutput,
)
from diptych.engine.forward_context import AttentionMetadata, forward_context
from diptych.engine.rope import cos_sin_cache
from diptych.kernels import ops
from diptych.kernels.rope import apply_rope_reference
from tests.kernels.helpers import INTERPRETED, Target, make_paged_kv, naive_attention
from tests.step_factories import make_step, make_tiny_model, random_prompts

CPU_FP32 = Target("cpu", torch.float32, atol=1e-5, rtol=1e-5)
HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 6, 2, 16, 4
# Kernel paths on CPU: the default (the C decode kernel, the torch prefill reference), the references
# throughout, and the Triton kernels in the interpreter.
MODES = [
    "auto",
    "reference",
    pytest.param("triton", marks=pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1")),
]
# (query rows, cached prefix) per sequence: a decode step, and prefill chunks (one after a cached prefix
# that ends mid-block, one empty).
DECODE = ([1, 1, 1], [0, 9, 30])
PREFILL = ([7, 5, 0, 12], [0, 9, 3, 17])


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("DIPTYCH_KERNELS", request.param)
    return str(request.param)


@dataclass
class Layer:
    """The parts of an attention layer a backend reads (PagedAttention's)."""

    layer_idx: int
    scale: float
    k_cache: torch.Tensor
    v_cache: torch.Tensor


@dataclass(frozen=True)
class Case:
    """One layer's attention inputs over a paged cache holding each sequence's prefix."""

    layer: Layer
    q: torch.Tensor  # [T, Hq, D], before RoPE
    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor
    cos_sin: torch.Tensor
    meta: AttentionMetadata
    prefix_keys: list[torch.Tensor]  # [prefix, Hk, D] each
    prefix_values: list[torch.Tensor]


def make_case(q_lens: list[int], prefixes: list[int], needs_lse: bool = False) -> Case:
    lens = [q + p for q, p in zip(q_lens, prefixes, strict=True)]
    paged = make_paged_kv(lens, KV_HEADS, HEAD_DIM, BLOCK_SIZE, CPU_FP32)  # this step's slots: overwritten
    tokens = sum(q_lens)
    positions = torch.cat([p + torch.arange(q) for q, p in zip(q_lens, prefixes)])
    seqs = torch.repeat_interleave(torch.arange(len(q_lens)), torch.tensor(q_lens))
    slots = paged.block_tables[seqs, positions // BLOCK_SIZE].long() * BLOCK_SIZE + positions % BLOCK_SIZE
    meta = AttentionMetadata(
        slot_mapping=slots,
        cu_seqlens_q=torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32),
        kv_lens=paged.kv_lens,
        block_tables=paged.block_tables,
        is_decode=all(q == 1 for q in q_lens),
        needs_lse=needs_lse,
    )
    return Case(
        layer=Layer(3, HEAD_DIM**-0.5, paged.k_cache, paged.v_cache),
        q=torch.randn(tokens, HEADS, HEAD_DIM),
        k=torch.randn(tokens, KV_HEADS, HEAD_DIM),
        v=torch.randn(tokens, KV_HEADS, HEAD_DIM),
        positions=positions,
        cos_sin=cos_sin_cache(HEAD_DIM, 128, 10000.0, None, torch.device("cpu")),
        meta=meta,
        prefix_keys=[keys[:p] for keys, p in zip(paged.keys, prefixes)],
        prefix_values=[values[:p] for values, p in zip(paged.values, prefixes)],
    )


@dataclass
class Run:
    """A backend's call on copies of a case's tensors, and what it left behind."""

    result: AttentionOutput
    q: torch.Tensor
    k: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    hooked: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)


def run_backend(case: Case, backend: AttentionBackend = PAGED_BACKEND) -> Run:
    layer = Layer(
        case.layer.layer_idx, case.layer.scale, case.layer.k_cache.clone(), case.layer.v_cache.clone()
    )
    q, k = case.q.clone(), case.k.clone()
    hooked: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    meta = AttentionMetadata(
        slot_mapping=case.meta.slot_mapping,
        cu_seqlens_q=case.meta.cu_seqlens_q,
        kv_lens=case.meta.kv_lens,
        block_tables=case.meta.block_tables,
        is_decode=case.meta.is_decode,
        kv_hook=lambda i, hk, hv: hooked.append((i, hk.clone(), hv.clone())),
        needs_lse=case.meta.needs_lse,
    )
    result = backend.forward(layer, q, k, case.v, case.positions, case.cos_sin, meta)
    return Run(result, q, k, layer.k_cache, layer.v_cache, hooked)


def todays_ops(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What PagedAttention did before backends: (out, k_cache, v_cache)."""
    meta, scale = case.meta, case.layer.scale
    q, k = case.q.clone(), case.k.clone()
    k_cache, v_cache = case.layer.k_cache.clone(), case.layer.v_cache.clone()
    ops.rope_and_store_kv(q, k, case.v, case.positions, case.cos_sin, k_cache, v_cache, meta.slot_mapping)
    if meta.is_decode:
        out, _ = ops.decode_attention(q, k_cache, v_cache, meta.kv_lens, meta.block_tables, scale)
    else:
        out = ops.prefill_attention(
            q, k_cache, v_cache, meta.cu_seqlens_q, meta.kv_lens, meta.block_tables, scale
        )
    return out, k_cache, v_cache


@pytest.mark.parametrize("batch", [DECODE, PREFILL], ids=["decode", "prefill"])
def test_paged_backend_does_what_the_ops_did(mode: str, batch: tuple[list[int], list[int]]) -> None:
    case = make_case(*batch)
    run = run_backend(case)
    out, k_cache, v_cache = todays_ops(case)
    torch.testing.assert_close(run.result.out, out, atol=0, rtol=0)
    torch.testing.assert_close(run.k_cache, k_cache, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(run.v_cache, v_cache, atol=0, rtol=0, equal_nan=True)
    # The hook saw the layer's own index and the k as it went into the cache (rotated), after the write.
    assert [i for i, _, _ in run.hooked] == [case.layer.layer_idx]
    torch.testing.assert_close(run.hooked[0][1], run.k, atol=0, rtol=0)
    torch.testing.assert_close(run.hooked[0][2], case.v, atol=0, rtol=0)


def expected_attention(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense fp64 attention over each sequence's prefix and this step's rotated keys: (out, lse [T, Hq])."""
    q, k = case.q.clone(), case.k.clone()
    apply_rope_reference(q, k, case.positions, case.cos_sin)
    bounds = case.meta.cu_seqlens_q.tolist()
    outs, lses = [], []
    for b, (start, end) in enumerate(itertools.pairwise(bounds)):
        if start == end:
            continue
        keys = torch.cat([case.prefix_keys[b], k[start:end]])
        values = torch.cat([case.prefix_values[b], case.v[start:end]])
        out, lse = naive_attention(q[start:end], keys, values, case.positions[start:end], case.layer.scale)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs).float(), torch.cat(lses).float()


def test_decode_returns_its_lse(mode: str) -> None:
    case = make_case(*DECODE)
    result = run_backend(case).result
    out, lse = expected_attention(case)
    assert result.lse is not None and result.lse.shape == (3, HEADS) and result.lse.dtype == torch.float32
    torch.testing.assert_close(result.out, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.lse, lse, atol=1e-5, rtol=1e-5)


def test_prefill_returns_its_lse_when_asked(mode: str) -> None:
    case = make_case(*PREFILL, needs_lse=True)
    result = run_backend(case).result
    out, lse = expected_attention(case)
    assert result.lse is not None and result.lse.shape == (24, HEADS) and result.lse.dtype == torch.float32
    torch.testing.assert_close(result.out, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.lse, lse, atol=1e-5, rtol=1e-5)


def test_prefill_makes_no_lse_unasked(mode: str) -> None:
    assert run_backend(make_case(*PREFILL)).result.lse is None


class RecordingBackend(AttentionBackend):
    """The paged backend, recording the layers it ran for and scaling their outputs by `gain`."""

    def __init__(self, gain: float = 1.0) -> None:
        self.gain = gain
        self.layers: list[int] = []

    def forward(
        self,
        layer: AttentionLayer,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        cos_sin: torch.Tensor,
        meta: AttentionMetadata,
    ) -> AttentionOutput:
        self.layers.append(layer.layer_idx)
        result = PAGED_BACKEND.forward(layer, q, k, v, positions, cos_sin, meta)
        return AttentionOutput(result.out * self.gain, result.lse)


def model_logits(backend: AttentionBackend | None, num_layers: int = 3) -> torch.Tensor:
    """Logits of a prefill then a decode step of a tiny model, both through `backend`."""
    tiny = make_tiny_model(num_layers)
    prompts = random_prompts([6, 9], tiny.vocab_size)
    steps = [make_step(tiny, [(p, 0) for p in prompts], backend=backend)]
    steps.append(make_step(tiny, [([5], len(p)) for p in prompts], backend=backend))
    logits = []
    for step in steps:
        with torch.inference_mode(), forward_context(step.meta):
            logits.append(tiny.model.compute_logits(tiny.model(step.input_ids, step.positions)))
    return torch.cat(logits)


def test_the_metadatas_backend_is_the_one_called() -> None:
    default = model_logits(None)
    recording = RecordingBackend()
    torch.testing.assert_close(model_logits(recording), default, atol=0, rtol=0)
    assert recording.layers == [0, 1, 2] * 2  # every layer, prefill then decode
    halving = RecordingBackend(gain=0.5)
    changed = model_logits(halving)
    assert halving.layers == [0, 1, 2] * 2
    assert (changed - default).abs().max() > 0.1
