"""CUDA-graph decode: a replayed step equals the eager forward (logits and KV writes, padding included),
batches past the largest graph run eagerly, and the engine's greedy tokens do not depend on graphs.

The GPU tests use SmolLM2-shaped random weights (the GPU host has no checkpoint)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from engine.config import preset
from engine.cuda_graphs import MAX_GRAPH_BATCH, graph_batch_sizes
from engine.forward_context import forward_context
from engine.kv_cache import PagedKVCache
from engine.llm_engine import EngineConfig, LLMEngine
from engine.messages import SamplingParams
from engine.model import LlamaForCausalLM, build_model, init_random_weights
from engine.model_runner import ModelRunner, StepInputs
from engine.scheduler import ScheduledChunk
from engine.sequence import Sequence
from tests.factories import make_engine, make_prompts

SHAPE = preset("smollm2-135m")
BLOCK_SIZE = 16
MAX_MODEL_LEN = 2048
GRAPH_MAX_SEQS = 32


@pytest.mark.parametrize("max_num_seqs", [1, 3, 8, 17, 64, 100, 300])
def test_buckets_cover_every_batch_with_little_padding(max_num_seqs: int) -> None:
    sizes = graph_batch_sizes(max_num_seqs)
    top = min(max_num_seqs, MAX_GRAPH_BATCH)
    assert sizes == sorted(set(sizes)) and sizes[0] == 1 and sizes[-1] == top
    assert all(b in (1, 2, 4, top) or b % 8 == 0 for b in sizes)
    for n in range(1, top + 1):
        bucket = min(b for b in sizes if b >= n)
        assert bucket == n or (bucket - n < 8 and bucket < 2 * n)  # pads by at most 7 rows, never doubles


def test_cpu_engine_ignores_cuda_graphs(tiny_llama_dir: str) -> None:
    engine = make_engine(tiny_llama_dir, cuda_graphs=True)
    assert engine.runner.graphs is None
    [seq] = engine.generate(
        make_prompts([5], engine.model_config.vocab_size), SamplingParams(max_tokens=3, ignore_eos=True)
    )
    assert len(seq.output_token_ids) == 3


# ---- GPU ----


def random_model(dtype: torch.dtype, seed: int) -> LlamaForCausalLM:
    model = build_model(SHAPE, dtype, torch.device("cuda"))
    init_random_weights(model, seed)
    return model.eval()


@pytest.fixture(scope="module")
def graph_runner() -> ModelRunner:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    device = torch.device("cuda")
    cache = PagedKVCache(SHAPE, 1200, BLOCK_SIZE, torch.bfloat16, device)
    cache.storage.normal_()  # a random context: attention over it must matter
    runner = ModelRunner(random_model(torch.bfloat16, seed=0), cache, device)
    runner.capture_decode_graphs(GRAPH_MAX_SEQS, MAX_MODEL_LEN)
    return runner


def decode_inputs(runner: ModelRunner, context_lens: list[int], seed: int) -> StepInputs:
    """One decode token per sequence at position len - 1, each sequence's blocks scattered at random."""
    gen = torch.Generator().manual_seed(seed)
    free = torch.randperm(runner.kv_cache.num_blocks, generator=gen).tolist()
    chunks, tables = [], []
    for i, (n, prompt) in enumerate(zip(context_lens, make_prompts(context_lens, SHAPE.vocab_size, seed))):
        chunks.append(ScheduledChunk(Sequence(f"s{i}", prompt, SamplingParams(), seed=0), n - 1, 1))
        blocks = -(-n // BLOCK_SIZE)
        tables.append(free[:blocks])
        free = free[blocks:]
    return runner.prepare(chunks, tables)


def eager_logits(runner: ModelRunner, inputs: StepInputs) -> torch.Tensor:
    with torch.inference_mode(), forward_context(inputs.meta):
        hidden = runner.model(inputs.input_ids, inputs.positions)
    return runner.model.compute_logits(hidden[inputs.sample_rows])


def counting(fn: Callable[..., torch.Tensor], calls: list[int]) -> Callable[..., torch.Tensor]:
    def wrapped(*args: object) -> torch.Tensor:
        calls.append(1)
        return fn(*args)

    return wrapped


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 3, 8, 17])
def test_graph_replay_equals_eager(
    graph_runner: ModelRunner, batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = graph_runner
    assert runner.graphs is not None
    lens = torch.randint(1, 1000, (batch,), generator=torch.Generator().manual_seed(batch)).tolist()
    inputs = decode_inputs(runner, lens, seed=batch)
    assert runner.graphs.can_replay(inputs.meta)
    replays: list[int] = []
    monkeypatch.setattr(runner.graphs, "replay", counting(runner.graphs.replay, replays))
    storage = runner.kv_cache.storage
    before = storage.clone()

    graph = runner.forward_logits(inputs)
    after_graph = storage.clone()
    storage.copy_(before)
    eager = eager_logits(runner, inputs)
    after_eager = storage.clone()

    assert replays == [1]
    assert graph.shape == eager.shape == (batch, SHAPE.vocab_size)
    scale = eager.abs().max().item()
    assert (graph - eager).abs().max().item() <= 0.05 * scale
    if batch > 1:  # ragged contexts give every row its own logits: the comparison is not vacuous
        assert (eager[1:] - eager[:1]).abs().max().item() > 0.2 * scale
    # Both wrote K/V at the batch's slots and nowhere else (the graph's padding rows wrote nothing).
    flat = [x.flatten(2, 3) for x in (before, after_graph, after_eager)]  # [2, layers, slots, Hk, D]
    written = torch.zeros(flat[0].shape[2], dtype=torch.bool, device=storage.device)
    written[inputs.meta.slot_mapping] = True
    assert torch.equal(flat[1][:, :, ~written], flat[0][:, :, ~written])
    assert torch.equal(flat[2][:, :, ~written], flat[0][:, :, ~written])
    new_kv, new_kv_eager = flat[1][:, :, written].float(), flat[2][:, :, written].float()
    assert (new_kv - new_kv_eager).abs().max().item() <= 0.05 * new_kv_eager.abs().max().item()
    assert not torch.equal(new_kv, flat[0][:, :, written].float())


@pytest.mark.gpu
def test_batches_past_the_largest_graph_and_prefills_run_eager(graph_runner: ModelRunner) -> None:
    assert graph_runner.graphs is not None
    too_many = decode_inputs(graph_runner, [5] * (GRAPH_MAX_SEQS + 1), seed=1)
    assert not graph_runner.graphs.can_replay(too_many.meta)
    seq = Sequence("prefill", make_prompts([9], SHAPE.vocab_size)[0], SamplingParams(), seed=0)
    prefill = graph_runner.prepare([ScheduledChunk(seq, 0, 9)], [[7]])
    assert not graph_runner.graphs.can_replay(prefill.meta)
    logits = graph_runner.forward_logits(too_many)
    torch.testing.assert_close(logits, eager_logits(graph_runner, too_many), rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_engine_greedy_tokens_equal_with_and_without_graphs(monkeypatch: pytest.MonkeyPatch) -> None:
    # fp32: flat random logits have near-ties that bf16 rounding differences could flip.
    model = random_model(torch.float32, seed=1)
    lengths = [3, 17, 40, 64, 100, 129, 200, 257, 300, 31, 8, 77]
    prompts = make_prompts(lengths, SHAPE.vocab_size, seed=2)
    # Different lengths: the batch shrinks as sequences finish, replaying several buckets.
    params = [SamplingParams(max_tokens=4 + 3 * i, temperature=0.0, ignore_eos=True) for i in range(12)]
    outputs: dict[bool, list[list[int]]] = {}
    replays: list[int] = []
    for graphs in (False, True):
        engine = LLMEngine(
            EngineConfig(
                model="random:smollm2-135m",
                dtype="float32",
                device="cuda",
                max_num_seqs=16,
                max_model_len=1024,
                gpu_memory_fraction=0.05,
                cuda_graphs=graphs,
                load_progress=False,
            ),
            model=model,
        )
        assert (engine.runner.graphs is not None) == graphs
        if engine.runner.graphs is not None:
            monkeypatch.setattr(
                engine.runner.graphs, "replay", counting(engine.runner.graphs.replay, replays)
            )
        outputs[graphs] = [s.output_token_ids for s in engine.generate(prompts, params)]
    assert len(replays) == max(p.max_tokens for p in params) - 1  # every step after the prefill
    assert outputs[True] == outputs[False]
    assert [len(o) for o in outputs[True]] == [p.max_tokens for p in params]
