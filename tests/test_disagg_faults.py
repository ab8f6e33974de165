"""Slow prefills and killed workers, on a deployment of their own (1 prefill x 2 decode actors, the
embedded SmolLM2, KV over gloo, the real gateway, a short KV transfer timeout): prompts whose queueing and
prefill take longer than the transfer timeout are served; requests on a dead worker fail promptly with a
clear error, the dead worker leaves /metrics and new requests are served by the survivors."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import ray

from tests.deployment import running_deployment
from tests.test_disagg import PROMPTS, chat_body, deployment_config

pytestmark = pytest.mark.slow
WORKERS = ["prefill-0", "decode-0", "decode-1"]
TRANSFER_TIMEOUT_S = 5.0  # far shorter than the time the long prompts below wait for and spend in prefill


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    config = deployment_config(str(tmp_path_factory.mktemp("ray")), prefill_workers=1)
    config["kv_transport"]["timeout_s"] = TRANSFER_TIMEOUT_S
    for pool in ("prefill", "decode"):
        config[pool]["kv_cache_gib"] = 0.3  # the three long prompts fit at once
    with running_deployment(config) as url:
        yield url


def loads() -> dict[str, Any]:
    return {w: ray.get(ray.get_actor(f"diptych-{w}").load.remote()) for w in WORKERS}


def test_prompts_that_wait_and_prefill_longer_than_the_transfer_timeout_are_served(gateway: str) -> None:
    """Three ~1.4k-token prompts at once: with 64-token chunks the last one's KV lands many transfer
    timeouts after its decode reservation was made (the reservation used to expire there, failing the
    request after all its prefill work)."""
    prompts = [" ".join(f"{name}{i}" for i in range(350)) for name in ("apple", "river", "stone")]

    async def run() -> list[tuple[httpx.Response, float]]:
        async with httpx.AsyncClient(base_url=gateway, timeout=120) as client:

            async def timed(prompt: str) -> tuple[httpx.Response, float]:
                started = time.monotonic()
                body = {"prompt": prompt, "max_tokens": 4, "temperature": 0}
                response = await client.post("/v1/completions", json=body)
                return response, time.monotonic() - started

            return await asyncio.gather(*(timed(p) for p in prompts))

    results = asyncio.run(run())
    for response, _ in results:
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["finish_reason"] == "length"
    slowest = max(took for _, took in results)
    assert slowest > TRANSFER_TIMEOUT_S, f"the test needs a prefill slower than the timeout ({slowest:.1f} s)"


def test_killed_decode_actor_fails_its_requests_and_new_ones_succeed(gateway: str) -> None:
    async def run() -> None:
        async with httpx.AsyncClient(base_url=gateway, timeout=120) as client:

            async def timed(i: int) -> tuple[httpx.Response, float]:
                body = chat_body(f"Tell me a long story number {i}.", False, max_tokens=200)
                response = await client.post("/v1/chat/completions", json=body)
                return response, time.monotonic()

            long_ones = [asyncio.ensure_future(timed(i)) for i in range(4)]
            deadline = time.monotonic() + 60
            victim = None
            while victim is None and time.monotonic() < deadline:
                running = await asyncio.to_thread(loads)
                victim = next((w for w in ("decode-0", "decode-1") if running[w].running), None)
                await asyncio.sleep(0.1)
            assert victim is not None, "no decode worker ever ran the long requests"
            ray.kill(ray.get_actor(f"diptych-{victim}"), no_restart=True)
            killed_at = time.monotonic()
            results = await asyncio.gather(*long_ones)
            failed = [(r, t) for r, t in results if r.status_code != 200]
            assert failed, "some request was on the killed worker"
            for r, ended in failed:
                assert ended - killed_at < 30  # no hang: requests on the dead worker end promptly
                # Decoding when it died, or still prefilling with KV bound for it: a clear error either way.
                message = r.json()["error"]["message"]
                assert r.status_code in (500, 503)
                assert f"worker {victim} died" in message or f"KV transfer to {victim} failed" in message
            for prompt in PROMPTS[:3]:  # new requests go to the surviving decode worker
                r = await client.post("/v1/chat/completions", json=chat_body(prompt, False))
                assert r.status_code == 200, r.text
            metrics = (await client.get("/metrics")).text
            assert f'worker="{victim}"' not in metrics  # its last load report is gone
            survivor = "decode-1" if victim == "decode-0" else "decode-0"
            assert f'worker="{survivor}"' in metrics

    asyncio.run(run())
