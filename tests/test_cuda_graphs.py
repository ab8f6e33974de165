"""CUDA-graph decode: a replayed step equals the eager forward (logits and KV writes, padding included),
batches past the largest graph run eagerly, and the engine's greedy tokens do not depend on graphs.
The host side that feeds them: ModelRunner.prepare's packed inputs equal a per-token reference (on CPU and
CUDA), a decode step is padded the way a graph reads it, and all-greedy sampling skips the sampling batch.

The GPU tests use SmolLM2-shaped random weights (the GPU host has no checkpoint)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import pytest
import torch

from diptych.engine.config import ModelConfig, preset
from diptych.engine.cuda_graphs import MAX_GRAPH_BATCH, decode_input_fields, graph_batch_sizes, unpack
from diptych.engine.forward_context import forward_context
from diptych.engine.kv_cache import PagedKVCache
from diptych.engine.llm_engine import EngineConfig, LLMEngine
from diptych.engine.messages import SamplingParams
from diptych.engine.model import LlamaForCausalLM, build_model, init_random_weights
from diptych.engine.model_runner import ModelRunner, StepInputs
from diptych.engine.sampler import SamplingBatch, sample
from diptych.engine.scheduler import ScheduledChunk
from diptych.engine.sequence import Sequence
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


# ---- host-side step inputs ----

TINY = ModelConfig(
    vocab_size=100,
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
)
HOST_BLOCK = 4


def tiny_runner(device: torch.device) -> ModelRunner:
    model = build_model(TINY, torch.float32, device)
    init_random_weights(model)
    return ModelRunner(model, PagedKVCache(TINY, 64, HOST_BLOCK, torch.float32, device), device)


def reference_inputs(chunks: list[ScheduledChunk], tables: list[list[int]]) -> dict[str, list]:
    """What prepare must produce, token by token in plain Python (its behaviour before packing)."""
    ref: dict[str, list] = dict(ids=[], pos=[], slots=[], cu=[0], kv=[], rows=[])
    for chunk, table in zip(chunks, tables):
        for p in range(chunk.start, chunk.start + chunk.num_tokens):
            ref["ids"].append(chunk.seq.all_token_ids[p])
            ref["pos"].append(p)
            ref["slots"].append(table[p // HOST_BLOCK] * HOST_BLOCK + p % HOST_BLOCK)
        ref["cu"].append(ref["cu"][-1] + chunk.num_tokens)
        ref["kv"].append(chunk.start + chunk.num_tokens)
        if chunk.samples:
            ref["rows"].append(ref["cu"][-1] - 1)
    width = max((len(t) for t in tables), default=0) or 1
    ref["tables"] = [t + [0] * (width - len(t)) for t in tables]
    return ref


def observed_inputs(inputs: StepInputs) -> dict[str, list]:
    m = inputs.meta
    got = dict(ids=inputs.input_ids, pos=inputs.positions, slots=m.slot_mapping, cu=m.cu_seqlens_q)
    got.update(kv=m.kv_lens, rows=inputs.sample_rows, tables=m.block_tables)
    dtypes = dict(ids=torch.int64, pos=torch.int64, slots=torch.int64, rows=torch.int64)
    assert all(t.dtype == dtypes.get(k, torch.int32) for k, t in got.items())
    return {k: t.tolist() for k, t in got.items()}


def random_steps(
    rng: random.Random, num_steps: int
) -> Iterator[tuple[list[ScheduledChunk], list[list[int]]]]:
    """Steps over a pool of sequences: decodes and prefill chunks, ragged tables that grow in place (as
    BlockManager's do), tables replaced by new lists, sequences leaving and coming back, empty steps."""
    seqs: dict[int, Sequence] = {}
    tables: dict[int, list[int]] = {}
    for _ in range(num_steps):
        decode = rng.random() < 0.5
        chunks, step_tables = [], []
        for key in rng.sample(range(12), rng.randint(0, 9)):
            if key not in seqs:
                prompt = [rng.randrange(TINY.vocab_size) for _ in range(rng.randint(1, 40))]
                seqs[key] = Sequence(f"s{key}", prompt, SamplingParams(), seed=0)
                tables[key] = []
            seq = seqs[key]
            if rng.random() < 0.3:
                seq.output_token_ids.append(rng.randrange(TINY.vocab_size))
            start = seq.num_tokens - 1 if decode else rng.randrange(seq.num_tokens)
            num_tokens = 1 if decode else rng.randint(1, seq.num_tokens - start)
            if rng.random() < 0.1:  # freed and allocated again: a new list
                tables[key] = []
            table = tables[key]
            while len(table) * HOST_BLOCK < start + num_tokens or rng.random() < 0.2:
                table.append(rng.randrange(64))
            chunks.append(ScheduledChunk(seq, start, num_tokens))
            step_tables.append(table)
        yield chunks, step_tables


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_prepare_matches_a_per_token_reference(device: str) -> None:
    runner = tiny_runner(torch.device(device))
    expected, prepared = [], []
    for chunks, tables in random_steps(random.Random(0), 200):
        expected.append(reference_inputs(chunks, tables))  # now: the next step grows the tables
        inputs = runner.prepare(chunks, tables)
        prepared.append(inputs)
        assert inputs.meta.is_decode == all(c.num_tokens == 1 for c in chunks)
        assert inputs.graph_inputs is None  # no graphs captured
    # Checked after every step is prepared: no step's inputs were overwritten by a later one's.
    for want, inputs in zip(expected, prepared):
        assert observed_inputs(inputs) == want


class Buckets:
    """The one question prepare asks of DecodeGraphs, answered as graphs captured up to 16 rows would."""

    sizes = graph_batch_sizes(16)

    def padded_size(self, num_rows: int, table_width: int) -> int | None:
        return next((b for b in self.sizes if b >= num_rows), None) if table_width <= 8 else None


def test_a_decode_step_is_packed_padded_for_its_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = tiny_runner(torch.device("cpu"))
    monkeypatch.setattr(runner, "graphs", Buckets())
    rng = random.Random(1)
    for batch in [1, 3, 5, 9, 16]:
        seqs = [
            Sequence(f"s{i}", [rng.randrange(100) for _ in range(rng.randint(1, 20))], SamplingParams(), 0)
            for i in range(batch)
        ]
        chunks = [ScheduledChunk(s, s.num_tokens - 1, 1) for s in seqs]
        tables = [[rng.randrange(64) for _ in range(-(-s.num_tokens // HOST_BLOCK))] for s in seqs]
        inputs = runner.prepare(chunks, tables)
        assert observed_inputs(inputs) == reference_inputs(chunks, tables)
        assert inputs.samples_every_row
        size = Buckets().padded_size(batch, 8)
        assert size is not None and inputs.graph_inputs is not None
        packed = unpack(inputs.graph_inputs, decode_input_fields(size))
        own = [inputs.input_ids, inputs.positions, inputs.meta.slot_mapping, inputs.meta.kv_lens]
        # Padding rows: a valid token and position, no KV written (slot -1), nothing attended (kv_len 0).
        for field, step_rows, pad in zip(packed, own, [0, 0, -1, 0]):
            assert field.tolist() == step_rows.tolist() + [pad] * (size - batch)
    seq = Sequence("long", list(range(40)), SamplingParams(), 0)  # 10 blocks: wider than any graph
    assert runner.prepare([ScheduledChunk(seq, 39, 1)], [list(range(10))]).graph_inputs is None
    assert runner.prepare([ScheduledChunk(seq, 30, 10)], [list(range(10))]).graph_inputs is None  # prefill


def sampling_seqs(params: list[SamplingParams]) -> list[Sequence]:
    seqs = [Sequence(f"r{i}", [1, 2, 3], p, seed=1000 + i) for i, p in enumerate(params)]
    for i, seq in enumerate(seqs):
        seq.output_token_ids.extend(range(i))
    return seqs


@pytest.mark.parametrize(
    "params, builds",
    [
        ([SamplingParams(temperature=0.0)] * 5, False),
        ([SamplingParams(temperature=0.0), SamplingParams(temperature=1e-6)], False),  # below the greedy cut
        ([SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, logprobs=True)], True),
        ([SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_k=20)], True),
    ],
)
def test_runner_sampling_equals_the_sampler_and_skips_the_batch_when_all_greedy(
    params: list[SamplingParams], builds: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = tiny_runner(torch.device("cpu"))
    seqs = sampling_seqs(params)
    logits = torch.randn(len(seqs), TINY.vocab_size, generator=torch.Generator().manual_seed(3)) * 3
    steps = [len(s.output_token_ids) for s in seqs]
    want = sample(logits, SamplingBatch.build(params, [s.seed for s in seqs], steps, torch.device("cpu")))
    built: list[int] = []
    build = SamplingBatch.build

    def counted_build(*args: object, **kwargs: object) -> SamplingBatch:
        built.append(1)
        return build(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(SamplingBatch, "build", counted_build)
    got = runner.sample(logits, seqs)
    assert bool(built) == builds
    assert got.token_ids.tolist() == want.token_ids.tolist()
    if want.logprobs is None:
        assert got.logprobs is None
    else:
        assert got.logprobs is not None and got.logprobs.tolist() == want.logprobs.tolist()


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
def test_a_smaller_batch_in_a_bucket_just_replayed_larger_writes_only_its_own_slots(
    graph_runner: ModelRunner,
) -> None:
    runner = graph_runner
    runner.forward_logits(decode_inputs(runner, [50] * 7, seed=5))  # bucket 8, rows 0-6 filled
    inputs = decode_inputs(runner, [60] * 5, seed=6)  # bucket 8 again: rows 5-7 are padding now
    storage = runner.kv_cache.storage
    before = storage.clone()
    runner.forward_logits(inputs)
    changed = (storage != before).flatten(2, 3).any(-1).any(-1).any(0).any(0)  # per slot
    assert changed.nonzero().flatten().tolist() == sorted(inputs.meta.slot_mapping.tolist())


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
