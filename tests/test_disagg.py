"""The disaggregated path end to end on CPU: a local Ray cluster, 2 prefill x 2 decode actors with the
embedded SmolLM2, KV over gloo channels, the real gateway over HTTP; checked against the single-process
engine. Each test stands alone (tests/test_disagg_faults.py kills workers on a deployment of its own)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import ray

from diptych.engine.messages import SamplingParams
from diptych.engine.tokenizer import Tokenizer, load_tokenizer
from tests.deployment import running_deployment, wait_until
from tests.factories import make_engine

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "Name three primary colors.",
    "What is 2 + 2?",
    "Give me a word that rhymes with cat.",
    "Say hello in Spanish.",
]
MAX_TOKENS = 12
WORKERS = ["prefill-0", "prefill-1", "decode-0", "decode-1"]


def deployment_config(ray_dir: str, prefill_workers: int = 2, decode_workers: int = 2) -> dict[str, Any]:
    return {
        "prefill": {"workers": prefill_workers, "chunk_size": 64, "token_budget": 128, "kv_cache_gib": 0.1},
        "decode": {"workers": decode_workers, "max_batch": 16, "kv_cache_gib": 0.1},
        "kv_transport": {"backend": "gloo", "timeout_s": 20.0},
        "gateway": {"port": 0},
        "ray": {"num_cpus": 2, "temp_dir": ray_dir, "shutdown_grace_s": 2},
    }


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_deployment(deployment_config(str(tmp_path_factory.mktemp("ray")))) as url:
        yield url


@pytest.fixture(scope="module")
def tokenizer(gateway: str) -> Tokenizer:
    from diptych.engine.loader import resolve_model

    return load_tokenizer(resolve_model(None))


@pytest.fixture(scope="module")
def reference(tokenizer: Tokenizer) -> dict[str, list[int]]:
    """Greedy tokens of each prompt from the single-process engine (the reference implementation)."""
    engine = make_engine(None, block_size=16, kv_cache_gib=0.1)
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
    seqs = engine.generate(ids, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    return {p: s.output_token_ids for p, s in zip(PROMPTS, seqs)}


def loads() -> dict[str, Any]:
    return {w: ray.get(ray.get_actor(f"diptych-{w}").load.remote()) for w in WORKERS}


def all_idle() -> bool:
    return all(r.used_blocks == 0 and r.running == 0 and r.waiting == 0 for r in loads().values())


def chat_body(prompt: str, stream: bool, max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }


async def chat(client: httpx.AsyncClient, prompt: str, stream: bool) -> str:
    if not stream:
        r = await client.post("/v1/chat/completions", json=chat_body(prompt, False))
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]
    import json

    text = []
    async with client.stream("POST", "/v1/chat/completions", json=chat_body(prompt, True)) as r:
        assert r.status_code == 200
        lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        delta = json.loads(line[6:])["choices"][0]["delta"]
        text.append(delta.get("content") or "")
    return "".join(text)


def test_greedy_outputs_equal_single_process_engine(
    gateway: str, tokenizer: Tokenizer, reference: dict[str, list[int]]
) -> None:
    async def run() -> list[str]:
        async with httpx.AsyncClient(base_url=gateway, timeout=120) as client:
            return await asyncio.gather(*(chat(client, p, stream=i % 2 == 0) for i, p in enumerate(PROMPTS)))

    texts = asyncio.run(run())
    for prompt, text in zip(PROMPTS, texts):
        expected = tokenizer.decode(reference[prompt])
        assert text == expected, prompt
    assert "Paris" in texts[0]
    wait_until(all_idle, 10, "every worker to return to idle")


def test_requests_spread_over_all_four_workers(gateway: str) -> None:
    before = {w: r.served for w, r in loads().items()}

    async def run() -> list[str]:
        async with httpx.AsyncClient(base_url=gateway, timeout=120) as client:
            return await asyncio.gather(*(chat(client, p, stream=False) for p in PROMPTS))

    asyncio.run(run())
    served = {w: r.served - before[w] for w, r in loads().items()}
    assert all(n > 0 for n in served.values()), served


def test_openai_client_chat_and_completions(
    gateway: str, tokenizer: Tokenizer, reference: dict[str, list[int]]
) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0)
    prompt = PROMPTS[0]
    expected = tokenizer.decode(reference[prompt])
    chat_ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    from openai.types.chat import ChatCompletionMessageParam

    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": prompt}]
    out = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=messages,
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    assert out.choices[0].message.content == expected
    assert out.usage is not None and out.usage.prompt_tokens == len(chat_ids)
    assert out.usage.completion_tokens == len(reference[prompt])
    chunks = list(
        client.chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=messages,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(reference[prompt])
    completion = client.completions.create(
        model="SmolLM2-135M-Instruct", prompt=chat_ids, max_tokens=MAX_TOKENS, temperature=0
    )
    assert completion.choices[0].text == expected
    assert completion.usage is not None and completion.usage.prompt_tokens == len(chat_ids)
    streamed = client.completions.create(
        model="SmolLM2-135M-Instruct", prompt=chat_ids, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_dropped_stream_returns_blocks_to_idle(gateway: str) -> None:
    with (
        httpx.Client(base_url=gateway, timeout=60) as client,
        client.stream(
            "POST",
            "/v1/chat/completions",
            json=chat_body("Tell me a long story about a dragon.", True, max_tokens=400),
        ) as r,
    ):
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # a few chunks, then hang up mid-stream
        assert any(line.startswith("data: {") for line in got)
    wait_until(all_idle, 15, "both workers' blocks to return to idle after the disconnect")


def test_abort_during_kv_transfer_returns_blocks_to_idle_and_channel_stays_in_sync(
    gateway: str, tokenizer: Tokenizer, reference: dict[str, list[int]]
) -> None:
    long_prompt = " ".join(f"word{i}" for i in range(300))  # ~1.2k tokens: many 64-token prefill chunks

    async def abort_mid_prefill() -> None:
        async with httpx.AsyncClient(base_url=gateway, timeout=60) as client:
            task = asyncio.ensure_future(
                client.post(
                    "/v1/completions", json={"prompt": long_prompt, "max_tokens": 4, "temperature": 0}
                )
            )
            # Wait until a prefill worker is busy with it and its decode worker holds a reservation.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                busy = await asyncio.to_thread(loads)
                if any(r.running for w, r in busy.items() if w.startswith("prefill")) and any(
                    r.waiting for w, r in busy.items() if w.startswith("decode")
                ):
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the long prompt never reached a prefill worker")
            task.cancel()  # the client goes away while KV is still streaming
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(abort_mid_prefill())
    wait_until(all_idle, 20, "both workers' blocks to return to idle after an abort mid-transfer")

    async def again() -> list[str]:  # every channel still carries exact KV afterwards
        async with httpx.AsyncClient(base_url=gateway, timeout=120) as client:
            return await asyncio.gather(*(chat(client, p, stream=False) for p in PROMPTS[:4]))

    for prompt, text in zip(PROMPTS[:4], asyncio.run(again())):
        assert text == tokenizer.decode(reference[prompt])


def test_bad_requests_get_errors_and_the_server_keeps_serving(gateway: str) -> None:
    with httpx.Client(base_url=gateway, timeout=60) as client:
        too_long = client.post("/v1/completions", json={"prompt": list(range(9000)), "max_tokens": 4})
        assert too_long.status_code == 400 and too_long.json()["error"]["type"]
        # Fits the context but not a decode worker's KV cache (0.1 GiB here): a clear 400 too.
        too_big = client.post("/v1/completions", json={"prompt": list(range(5000)), "max_tokens": 4})
        assert too_big.status_code == 400 and "KV" in too_big.json()["error"]["message"]
        assert client.post("/v1/chat/completions", content=b"{not json").status_code == 400
        assert client.post("/v1/chat/completions", json={"messages": [], "max_tokens": 0}).status_code == 400
        assert (
            client.post("/v1/chat/completions", json={**chat_body("hi", False), "model": "nope"}).status_code
            == 404
        )
        ok = client.post("/v1/chat/completions", json=chat_body("hi", False))
        assert ok.status_code == 200
        assert client.get("/health").status_code == 200
        metrics = client.get("/metrics").text
        counts = {
            line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if "_count" in line
        }
        for histogram in ("time_to_first_token", "queue_time", "kv_transfer"):
            name = next(n for n in counts if histogram in n)
            assert counts[name] > 0, f"{name} never observed"


def test_decode_starts_before_anyone_relays_the_first_token(
    gateway: str, tokenizer: Tokenizer, reference: dict[str, list[int]]
) -> None:
    """The first token rides the KV stream: with the prefill done and nobody reading the decode side's
    stream yet, the decode worker is already decoding; the tokens read afterwards are the reference's."""
    from diptych.cluster.clients import ControllerClient
    from diptych.engine.messages import GenerateRequest

    prompt = PROMPTS[0]
    ids = tuple(tokenizer.apply_chat_template([{"role": "user", "content": prompt}]))
    request = GenerateRequest("no-relay", ids, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))

    async def run() -> list[int]:
        controller = await ControllerClient.find()
        prefill, decode = controller.prefill("prefill-0"), controller.decode("decode-1")
        await controller.ensure_channel(prefill.worker_id, decode.worker_id)
        before = (await decode.load()).served
        assert (await decode.reserve(request, prefill.worker_id)).reserved
        result = await prefill.prefill(request, decode.worker_id)  # returns a status, not the token
        assert result.ok and not hasattr(result, "token_ids")
        deadline = time.monotonic() + 20
        while (await decode.load()).served == before:  # admitted on the first token from the KV stream
            assert time.monotonic() < deadline, "decode never started on its own"
            await asyncio.sleep(0.02)
        return [t async for delta in decode.stream(request.request_id) for t in delta.token_ids]

    assert asyncio.run(run()) == reference[prompt]
    wait_until(all_idle, 10, "both workers to free the request (prefill on decode's word that it landed)")


def test_a_second_gateway_process_serves_the_same_deployment(
    gateway: str, tokenizer: Tokenizer, reference: dict[str, list[int]], tmp_path: Any
) -> None:
    """`diptych gateway` in another process joins the deployment through its controller actor; both
    gateways serve at once, with the reference's tokens, and share the workers."""
    import os
    import subprocess
    import sys

    address = ray.get_runtime_context().gcs_address
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    command = [sys.executable, "-m", "diptych.cluster.cli", "gateway", "--address", address, "--port", "0"]
    second = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = None
        assert second.stdout is not None
        for line in second.stdout:  # the gateway prints its URL once it listens
            if line.startswith("diptych gateway listening on "):
                url = line.split()[-1]
                break
        assert url is not None, f"the second gateway exited with {second.wait()}"

        async def both() -> list[str]:
            async with (
                httpx.AsyncClient(base_url=gateway, timeout=120) as one,
                httpx.AsyncClient(base_url=url, timeout=120) as two,
            ):
                return await asyncio.gather(
                    *(chat(one if i % 2 else two, p, stream=i % 3 == 0) for i, p in enumerate(PROMPTS))
                )

        for prompt, text in zip(PROMPTS, asyncio.run(both())):
            assert text == tokenizer.decode(reference[prompt]), prompt
        with httpx.Client(base_url=url, timeout=30) as client:
            lines = client.get("/metrics").text.splitlines()
        totals = [line for line in lines if line.startswith("diptych_worker_kv_blocks_total{")]
        workers = {line.split('worker="')[1].split('"')[0] for line in totals}
        assert workers == set(WORKERS)
    finally:
        second.terminate()
        second.wait(30)
    wait_until(all_idle, 10, "every worker to return to idle")
