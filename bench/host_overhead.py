"""Host time of the bookkeeping around one decode step, every sequence at context 2048, at B1, B8, B64.

    python -m bench.host_overhead [--reps 200] [--steps 48]

A decode step is serial: the GPU idles while the host packs the next step's inputs, stages them for the
CUDA graph and turns the sampled logits into tokens, so every microsecond here adds to the step time. A
one-layer model of width 64 keeps the forward small; the bookkeeping does not depend on the model's size.
Rows, in microseconds (median; lower is better):

- prepare_B{B}: ModelRunner.prepare (on CUDA: until the host-to-device copy is queued).
- sample_B{B}: ModelRunner.sample for greedy rows on ready logits (argmax and the .tolist() sync included).
- replay_B{B} (CUDA only): DecodeGraphs.replay, staging copies and graph launch, host time.
- host_B{B}: the sum of the rows above.
- step_B{B} (CUDA only): a whole engine.step() (schedule, prepare, forward, sample, append), wall time.

Runs on CPU or CUDA; prints a table and writes bench/results/host_overhead-<host>.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from bench.results import Row, write_result
from diptych.engine.config import ModelConfig
from diptych.engine.llm_engine import EngineConfig, LLMEngine
from diptych.engine.messages import GenerateRequest, SamplingParams, TokenDelta
from diptych.engine.model import build_model, init_random_weights

CONTEXT = 2048
BATCHES = (1, 8, 64)
BLOCK_SIZE = 16
TINY = ModelConfig(
    vocab_size=256,  # the sampler's argmax over it is noise next to its bookkeeping
    hidden_size=64,
    intermediate_size=128,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    head_dim=32,
    max_position_embeddings=2 * CONTEXT,
)


def make_engine(device: torch.device) -> LLMEngine:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(TINY, dtype, device)
    init_random_weights(model)
    config = EngineConfig(
        dtype="bfloat16" if device.type == "cuda" else "float32",
        device=device.type,
        block_size=BLOCK_SIZE,
        kv_cache_gib=0.1,  # CPU: 64 sequences of 2.1k tokens take 35 MB with this model
        gpu_memory_fraction=0.05,
        max_num_seqs=max(BATCHES),
        max_model_len=2 * CONTEXT,
        load_progress=False,
    )
    return LLMEngine(config, model=model.eval())


def admit(engine: LLMEngine, batch: int, max_tokens: int) -> list[str]:
    """`batch` sequences whose prompt KV is in place, as a decode worker admits prefilled requests."""
    gen = torch.Generator().manual_seed(batch)
    ids = [f"B{batch}-{i}" for i in range(batch)]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, request_id in enumerate(ids):
        prompt = torch.randint(0, TINY.vocab_size, (CONTEXT,), generator=gen).tolist()
        assert engine.blocks.reserve(request_id, CONTEXT), "the KV cache is too small for the batch"
        request = GenerateRequest(request_id, tuple(prompt), params)
        engine.admit_prefilled(request, seed=i, first=TokenDelta(request_id, (prompt[-1],)))
    return ids


def host_micros(fn: Callable[[], object], reps: int, sync: Callable[[], None]) -> float:
    """Median host time of fn in microseconds; the device is drained between calls, outside the timing,
    as the sampled tokens' copy back drains it between engine steps."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    sync()
    return statistics.median(times) * 1e6


def batch_rows(engine: LLMEngine, batch: int, reps: int, steps: int) -> list[Row]:
    device, runner = engine.device, engine.runner
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    ids = admit(engine, batch, max_tokens=steps + 8)
    out = engine.scheduler.schedule()  # the step's decode chunks; not run, so it can be prepared again
    assert len(out.chunks) == batch and out.is_decode
    tables = [engine.blocks.block_table(c.seq.request_id) for c in out.chunks]
    seqs = [c.seq for c in out.chunks]
    logits = torch.randn(batch, TINY.vocab_size, device=device)
    parts = {
        "prepare": host_micros(lambda: runner.prepare(out.chunks, tables), reps, sync),
        "sample": host_micros(lambda: runner.sample(logits, seqs).token_ids.tolist(), reps, sync),
    }
    graphs = runner.graphs
    if graphs is not None:
        inputs = runner.prepare(out.chunks, tables)
        assert inputs.graph_inputs is not None, "a decode step of the bench must fit a graph"
        staged, block_tables = inputs.graph_inputs, inputs.meta.block_tables
        parts["replay"] = host_micros(lambda: graphs.replay(staged, block_tables), reps, sync)
    rows = [Row(f"{part}_B{batch}", micros, "us") for part, micros in parts.items()]
    rows.append(Row(f"host_B{batch}", sum(parts.values()), "us", note="sum of the parts above"))
    if device.type == "cuda":  # on CPU the forward's attention over the context swamps the host work
        rows.append(Row(f"step_B{batch}", step_micros(engine, batch, steps, sync), "us"))
    for request_id in ids:
        engine.abort_request(request_id)
    return rows


def step_micros(engine: LLMEngine, batch: int, steps: int, sync: Callable[[], None]) -> float:
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        assert len(engine.step()) == batch
        times.append(time.perf_counter() - t0)
    return statistics.median(times[3:]) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--steps", type=int, default=48)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    engine = make_engine(device)
    with torch.inference_mode():
        rows = [row for batch in BATCHES for row in batch_rows(engine, batch, args.reps, args.steps)]
    extra = {
        "context": CONTEXT,
        "block_size": BLOCK_SIZE,
        "model": "1 layer, hidden 64, random weights",
        "cuda_graphs": engine.runner.graphs is not None,
        "meaning": "host microseconds per decode step (median); no ceilings",
    }
    write_result("host_overhead", rows, extra)


if __name__ == "__main__":
    main()
