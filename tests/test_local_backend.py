"""The single-process engine behind the gateway's backend interface (the colocated baseline)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from typing import cast

import pytest

from diptych.cluster.local_backend import LocalEngineBackend
from diptych.engine.messages import GenerateRequest, SamplingParams, TokenDelta
from diptych.router.backend import BackendRejectedError
from tests.factories import make_engine, make_prompts


def test_streams_equal_the_engine_and_abandoned_streams_free_their_blocks(tiny_llama_dir: str) -> None:
    reference = make_engine(tiny_llama_dir)
    prompts = make_prompts([5, 17, 9], reference.model_config.vocab_size, seed=4)
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    expected = [s.output_token_ids for s in reference.generate(prompts, params)]
    backend = LocalEngineBackend(make_engine(tiny_llama_dir), "tiny")
    blocks = backend.engine.blocks

    async def collect(i: int, prompt: list[int]) -> list[int]:
        tokens: list[int] = []
        async for delta in backend.generate(GenerateRequest(f"r{i}", tuple(prompt), params)):
            tokens.extend(delta.token_ids)
        return tokens

    async def abandon() -> None:
        request = GenerateRequest("gone", tuple(prompts[0]), SamplingParams(max_tokens=400))
        stream = cast(AsyncGenerator[TokenDelta, None], backend.generate(request))
        await stream.__anext__()
        await stream.aclose()  # the consumer goes away after one token

    async def run() -> list[list[int]]:
        got = await asyncio.gather(*(collect(i, p) for i, p in enumerate(prompts)))
        await abandon()
        return got

    try:
        assert asyncio.run(run()) == expected
        deadline = time.monotonic() + 10
        while blocks.num_free_blocks != blocks.num_blocks and time.monotonic() < deadline:
            time.sleep(0.02)
        assert blocks.num_free_blocks == blocks.num_blocks
        assert not backend.engine.has_unfinished()
        too_long = GenerateRequest("long", tuple(range(600)), params)
        with pytest.raises(BackendRejectedError, match="context"):
            asyncio.run(anext(backend.generate(too_long)))  # type: ignore[arg-type]
    finally:
        backend.close()
