"""Disaggregated serving on two GPUs with Llama-3-8B-shaped random weights (prefill on GPU 0, decode on
GPU 1, KV over NCCL), measured through the controller's backend (no HTTP, no tokenizer):

1. exposed KV transfer: single long prompts, time from the prefill worker's first token to the decode
   worker having every layer, with layer-wise streaming and with sending after the forward;
2. a Poisson workload: TTFT and TPOT percentiles.

    python -m bench.disagg_serving [--requests 32] [--rate 2] [--prompt 512 4096] [--output 64]

Ceilings measured in the same run on GPU 0: HBM copy bandwidth (decode roofline: weights + KV bytes per
step) and the bf16 matmul rate (prefill roofline: 2 * params * tokens FLOPs).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
import uuid
from dataclasses import dataclass

from bench.ceilings import copy_bandwidth, matmul_rate
from bench.results import Row, write_result
from diptych.cluster.clients import ControllerClient
from diptych.cluster.config import DeploymentConfig, parse_config
from diptych.cluster.controller import Deployment
from diptych.cluster.disagg_backend import DisaggregatedBackend
from diptych.engine.config import preset
from diptych.engine.messages import GenerateRequest, SamplingParams
from diptych.router.policy import make_policy


@dataclass
class Trace:
    submitted: float
    first: float | None = None
    last: float | None = None
    tokens: int = 0
    prompt_len: int = 0
    exposed_s: float | None = None  # KV landed on decode minus first token sampled on prefill
    sampled: float | None = None  # when the prefill worker sampled the first token
    queue_s: float | None = None  # waiting in the prefill worker's queue before its first step


async def run_one(backend: DisaggregatedBackend, prompt: list[int], output: int) -> Trace:
    request = GenerateRequest(
        uuid.uuid4().hex, tuple(prompt), SamplingParams(max_tokens=output, ignore_eos=True)
    )
    trace = Trace(time.time(), prompt_len=len(prompt))
    first_token_time = None
    async for delta in backend.generate(request):
        if delta.error:
            raise RuntimeError(delta.error)
        now = time.time()
        if trace.first is None:
            trace.first = now
            first_token_time = trace.sampled = delta.first_token_time
            trace.queue_s = delta.queue_s
        if delta.kv_landed_time is not None and first_token_time is not None:
            trace.exposed_s = max(0.0, delta.kv_landed_time - first_token_time)
        trace.tokens += len(delta.token_ids)
        trace.last = now
    return trace


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def deployed(args: argparse.Namespace, config: DeploymentConfig) -> list[Row]:
    deployment = Deployment(config)
    try:
        return await bench(args, await deployment.start())
    finally:
        await deployment.stop()


async def bench(args: argparse.Namespace, controller: ControllerClient) -> list[Row]:
    backend = DisaggregatedBackend(controller, make_policy("least_loaded"), args.model, 8192)
    vocab = preset(args.model.split(":", 1)[1]).vocab_size
    rng = random.Random(0)
    prefill = controller.prefill("prefill-0")
    rows: list[Row] = []
    long_prompt = [rng.randrange(vocab) for _ in range(args.long_prompt)]
    for stream in (True, False):
        await prefill.set_stream_layers(stream)
        await run_one(backend, long_prompt, 2)  # warm-up (Triton compiles, NCCL connects)
        traces = [await run_one(backend, long_prompt, 2) for _ in range(args.long_reps)]
        exposed = statistics.median(t.exposed_s or 0.0 for t in traces)
        ttft = statistics.median((t.first or 0) - t.submitted for t in traces)
        mode = "layerwise" if stream else "after_prefill"
        rows.append(
            Row(
                f"kv_exposed_T{args.long_prompt}_{mode}",
                exposed * 1e3,
                "ms",
                note=f"TTFT {ttft * 1e3:.1f} ms",
            )
        )
        rows.append(Row(f"kv_exposed_fraction_of_ttft_{mode}", exposed / ttft, "ratio", ceiling=0.05))
    await prefill.set_stream_layers(True)

    async def poisson() -> list[Trace]:
        tasks = []
        for _ in range(args.requests):
            prompt = [rng.randrange(vocab) for _ in range(rng.randint(*args.prompt))]
            tasks.append(asyncio.ensure_future(run_one(backend, prompt, args.output)))
            await asyncio.sleep(rng.expovariate(args.rate))
        return await asyncio.gather(*tasks)

    t0 = time.time()
    traces = await poisson()
    wall = time.time() - t0
    ttfts = [(t.first or 0) - t.submitted for t in traces]
    print("request  submitted_s  prompt  ttft_ms  queue_ms  to_sampled_ms")
    for i, t in enumerate(traces):
        queue_ms, sampled_ms = (t.queue_s or 0) * 1e3, ((t.sampled or t.submitted) - t.submitted) * 1e3
        when, ttft_ms = t.submitted - t0, ttfts[i] * 1e3
        print(f"{i:7d}  {when:11.2f}  {t.prompt_len:6d}  {ttft_ms:7.0f}  {queue_ms:8.0f}  {sampled_ms:13.0f}")
    tpots = [((t.last or 0) - (t.first or 0)) / max(1, t.tokens - 1) for t in traces]
    for q in (0.5, 0.9):
        rows.append(Row(f"poisson_ttft_p{int(q * 100)}", pct(ttfts, q) * 1e3, "ms"))
        rows.append(Row(f"poisson_tpot_p{int(q * 100)}", pct(tpots, q) * 1e3, "ms"))
    rows.append(Row("poisson_output_throughput", sum(t.tokens for t in traces) / wall, "tok/s"))
    # Where TTFT goes: waiting for a prefill step, then to the first token sampled, then to the client.
    parts = {
        "queue": [t.queue_s or 0.0 for t in traces],
        "to_sampled": [(t.sampled or t.submitted) - t.submitted for t in traces],
        "sampled_to_client": [(t.first or 0) - (t.sampled or t.first or 0) for t in traces],
    }
    for part, values in parts.items():
        for q in (0.5, 0.9):
            rows.append(Row(f"poisson_ttft_{part}_p{int(q * 100)}", pct(values, q) * 1e3, "ms"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="random:llama3-8b")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--rate", type=float, default=2.0, help="Poisson arrivals per second")
    parser.add_argument("--prompt", type=int, nargs=2, default=(512, 4096))
    parser.add_argument("--output", type=int, default=64)
    parser.add_argument("--long-prompt", type=int, default=8192)
    parser.add_argument("--long-reps", type=int, default=3)
    parser.add_argument("--layers-per-message", type=int, default=4)
    args = parser.parse_args()

    bandwidth, flops = copy_bandwidth(), matmul_rate()
    shape = preset(args.model.split(":", 1)[1])
    config = parse_config(
        {
            "model": {"path": args.model, "dtype": "bfloat16", "max_model_len": 16384},
            "prefill": {
                "gpus_per_worker": 1,
                "chunk_size": 8192,
                "token_budget": 8192,
                "gpu_memory_fraction": 0.5,
            },
            "decode": {"gpus_per_worker": 1, "max_batch": 64, "gpu_memory_fraction": 0.8},
            "kv_transport": {
                "backend": "nccl",
                "layers_per_message": args.layers_per_message,
                "timeout_s": 60,
            },
        }
    )
    rows = asyncio.run(deployed(args, config))
    weight_bytes = shape.num_params * 2
    mean_prompt = sum(args.prompt) / 2
    tpot_roofline = (weight_bytes + shape.kv_bytes_per_token(2) * (mean_prompt + args.output / 2)) / bandwidth
    ttft_roofline = 2 * shape.num_params * mean_prompt / flops
    ceilings = {"poisson_tpot": tpot_roofline * 1e3, "poisson_ttft": ttft_roofline * 1e3}
    rows = [
        Row(r.name, r.value, r.unit, ceilings.get(r.name.rsplit("_", 1)[0], r.ceiling), r.system, r.note)
        for r in rows
    ]
    write_result(
        "disagg_serving",
        rows,
        extra={
            "hbm_copy_bandwidth_GBps": bandwidth / 1e9,
            "bf16_matmul_TFLOPs": flops / 1e12,
            "model": args.model,
            "requests": args.requests,
            "rate_per_s": args.rate,
            "prompt_range": args.prompt,
            "output_tokens": args.output,
            "layers_per_message": args.layers_per_message,
            "nccl_lanes": config.kv_transport.lanes,
            "ceiling_meaning": "ms rows: roofline time at batch 1 (fraction = roofline / measured)",
        },
    )


if __name__ == "__main__":
    main()
