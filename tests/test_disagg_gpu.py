"""Prefill on one GPU, decode on another, KV over NCCL: greedy outputs equal the single-GPU engine's.

The GPU host cannot carry the embedded GGUF, so this runs SmolLM2-shaped random weights (the same on
every process: seeded). Their logits are flat, so near-ties are common: requests run one at a time on
both sides, which gives both paths the same shapes and so bit-identical arithmetic."""

from __future__ import annotations

import asyncio
import tempfile
import uuid

import pytest
import torch

from diptych.engine.messages import GenerateRequest, SamplingParams

pytestmark = pytest.mark.gpu

MODEL = "random:smollm2-135m"
PROMPT_LENGTHS = [7, 40, 129, 300]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_nccl_disaggregated_greedy_equals_single_gpu_engine() -> None:
    pytest.importorskip("ray")
    from diptych.cluster.config import parse_config
    from diptych.cluster.controller import Deployment
    from diptych.cluster.disagg_backend import DisaggregatedBackend
    from diptych.engine.llm_engine import EngineConfig, LLMEngine
    from diptych.router.policy import make_policy

    params = SamplingParams(max_tokens=24, temperature=0.0)
    config = parse_config(
        {
            "model": {"path": MODEL, "dtype": "bfloat16"},
            "prefill": {"gpus_per_worker": 1, "gpu_memory_fraction": 0.3},
            "decode": {"gpus_per_worker": 1, "gpu_memory_fraction": 0.3},
            "kv_transport": {"backend": "nccl", "layers_per_message": 4},
            "ray": {"temp_dir": tempfile.mkdtemp(prefix="ray-", dir="/tmp")},  # short: AF_UNIX paths < 108 B
        }
    )
    reference = LLMEngine(
        EngineConfig(model=MODEL, dtype="bfloat16", device="cuda:0", gpu_memory_fraction=0.2)
    )
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 49152, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]
    expected = [reference.generate([p], params)[0].output_token_ids for p in prompts]
    del reference
    torch.cuda.empty_cache()

    async def run() -> list[list[int]]:
        deployment = Deployment(config)
        try:
            controller = await deployment.start()
            backend = DisaggregatedBackend(controller, make_policy("least_loaded"), "smollm2", 8192)
            got = []
            for ids in prompts:
                request = GenerateRequest(uuid.uuid4().hex, tuple(ids), params)
                tokens: list[int] = []
                async for delta in backend.generate(request):
                    assert delta.error is None, delta.error
                    tokens.extend(delta.token_ids)
                got.append(tokens)
            for _ in range(50):  # prefill frees its copy when decode says the KV landed: soon after
                loads = [await controller.worker(r.worker_id).load() for r in (await controller.view()).loads]
                if all(r.used_blocks == 0 for r in loads):
                    break
                await asyncio.sleep(0.1)
            assert len(loads) == 2 and all(r.used_blocks == 0 for r in loads), loads
            return got
        finally:
            await deployment.stop()

    assert asyncio.run(run()) == expected
