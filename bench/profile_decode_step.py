"""Where a decode step's time goes on a GPU: the whole engine step against its parts, for the decode-step
rows of bench/gpu_engine.py (Llama-3-8B-shaped random weights, bf16, context 2048, CUDA graphs on).

- step: wall time of engine.step() (schedule, inputs, graph replay, LM head, sampler, token copy-back),
  with async scheduling (the default on CUDA) and serial;
- replay: GPU time of the captured decode graph alone, replayed back to back (the forward, no host work);
- head: GPU time of the LM head and greedy sampling of the batch's rows;
- host: serial step - replay - head, the time the GPU would wait for the host without running ahead.
Then the top kernels of a few steps by GPU time (torch.profiler). A profiling aid, not a benchmark: it
writes no result file.

    python -m bench.profile_decode_step [--batches 1 64] [--trace-dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import replace

import torch
from torch.profiler import ProfilerActivity, profile

from bench.ceilings import copy_bandwidth
from bench.gpu_engine import CONTEXT, decode_roofline_seconds, engine_config, greedy, random_prompts
from diptych.engine.llm_engine import LLMEngine
from diptych.engine.messages import GenerateRequest, TokenDelta
from diptych.engine.sampler import SamplingBatch, sample

STEPS = 20


def admit(engine: LLMEngine, batch: int) -> list[str]:
    """`batch` sequences decoding at CONTEXT, admitted as a decode worker admits prefilled requests."""
    ids = [f"profile-B{batch}-{i}" for i in range(batch)]
    for i, (request_id, prompt) in enumerate(zip(ids, random_prompts(batch, CONTEXT, 128256), strict=True)):
        assert engine.blocks.reserve(request_id, CONTEXT), "the KV cache is too small for the batch"
        request = GenerateRequest(request_id, tuple(prompt), greedy(10 * STEPS))
        engine.admit_prefilled(request, seed=i, first=TokenDelta(request_id, (prompt[-1],)))
    return ids


def gpu_ms(fn: Callable[[], object], reps: int = STEPS) -> float:
    """Median GPU time of fn, each call between two events."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def step_ms(engine: LLMEngine) -> float:
    times = []
    for _ in range(STEPS):
        t0 = time.perf_counter()
        engine.step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def profile_batch(engine: LLMEngine, batch: int, bandwidth: float, trace_dir: str | None) -> None:
    ids = admit(engine, batch)
    for _ in range(3):
        engine.step()
    wall = step_ms(engine)
    engine.config = replace(engine.config, async_scheduling=False)
    serial = step_ms(engine)
    engine.config = replace(engine.config, async_scheduling=True)
    graphs = engine.runner.graphs
    assert graphs is not None
    size = next(b for b in graphs.batch_sizes if b >= batch)
    replay = gpu_ms(graphs.graphs[size].replay)
    hidden = graphs.hidden[:batch]
    sampling = SamplingBatch.build(
        [greedy(1)] * batch, seeds=[0] * batch, steps=[0] * batch, device=hidden.device
    )
    head = gpu_ms(lambda: sample(engine.model.compute_logits(hidden), sampling))
    roofline = decode_roofline_seconds(engine.model_config, batch, CONTEXT + 10, bandwidth) * 1e3
    print(
        f"B{batch}: step {wall:.2f} ms (serial {serial:.2f}) | replay {replay:.2f} | head {head:.2f} | "
        f"host (rest) {serial - replay - head:.2f} | roofline {roofline:.2f} ms "
        f"(step {roofline / wall:.2f}, replay+head {roofline / (replay + head):.2f} of it)"
    )
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            engine.step()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
    if trace_dir:
        prof.export_chrome_trace(f"{trace_dir}/decode_step_B{batch}.json")
    for request_id in ids:
        engine.abort_request(request_id)
    while engine.has_unfinished():  # the step still in flight
        engine.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--trace-dir")
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    engine = LLMEngine(engine_config())
    for batch in args.batches:
        profile_batch(engine, batch, bandwidth, args.trace_dir)


if __name__ == "__main__":
    main()
