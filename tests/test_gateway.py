"""The OpenAI-compatible gateway over HTTP, against a scripted backend and the real SmolLM2 tokenizer.

The backend double streams a known token sequence with delays, so every text the gateway returns has
an independent reference: the tokenizer's own decode of the same ids. The real engine behind the
gateway is tested end to end elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families

from diptych.engine.loader import resolve_model
from diptych.engine.messages import FinishReason, GenerateRequest, LoadReport, SamplingParams, TokenDelta
from diptych.engine.tokenizer import Tokenizer, load_tokenizer
from diptych.router.app import build_app
from diptych.router.backend import BackendUnavailableError, GenerationBackend, Phase
from diptych.router.policy import LeastLoaded, NoWorkerError, make_policy
from diptych.router.server import GatewayServer
from diptych.router.settings import GatewaySettings

TEXT = "The capital of France is Paris. It is known for the Eiffel Tower, museums and good food."
MODEL = "smollm2-test"
CONTEXT = 256
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


# ---- the backend double ----


@dataclass
class ScriptedBackend(GenerationBackend):
    """Streams `script` (two tokens per delta after the first, like a decode step after prefill)."""

    script: list[int]
    delay_s: float = 0.002
    healthy: bool = True
    fail_after: int | None = None  # send an error delta after this many tokens
    unavailable: bool = False  # refuse every request with BackendUnavailableError
    model_name: str = MODEL
    max_model_len: int = CONTEXT
    requests: list[GenerateRequest] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        self.requests.append(request)
        if self.unavailable:
            raise BackendUnavailableError("no decode worker")
        self.report_timing(Phase.QUEUE, 0.003)
        self.report_timing(Phase.KV_TRANSFER, 0.0015)
        limit = min(request.sampling.max_tokens, len(self.script))
        sent = 0
        while sent < limit and request.request_id not in self.aborted:
            await asyncio.sleep(self.delay_s)
            if self.fail_after is not None and sent >= self.fail_after:
                yield TokenDelta(
                    request.request_id, (), finish_reason=FinishReason.ERROR, error="decode worker died"
                )
                return
            ids = tuple(self.script[sent : min(limit, sent + (1 if sent == 0 else 2))])
            sent += len(ids)
            finish = None if sent < limit else _finish(limit, len(self.script))
            logprobs = tuple(fake_logprob(t) for t in ids) if request.sampling.logprobs else None
            yield TokenDelta(request.request_id, ids, logprobs, finish_reason=finish)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def load(self) -> list[LoadReport]:
        return [
            LoadReport("prefill-0", "prefill", running=1, waiting=2, used_blocks=3, total_blocks=100),
            LoadReport("decode-0", "decode", 4, 0, 57, 200, served=9, kv_transfer_s_mean=0.0125),
        ]

    async def check_health(self) -> bool:
        return self.healthy


def _finish(limit: int, script_len: int) -> FinishReason:
    return FinishReason.STOP if limit == script_len else FinishReason.LENGTH


def fake_logprob(token_id: int) -> float:
    return -((token_id % 97) + 1) / 100.0


# ---- fixtures and helpers ----


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_tokenizer(resolve_model(None))


@pytest.fixture(scope="module")
def script(tokenizer: Tokenizer) -> list[int]:
    return list(tokenizer.encode(TEXT))


@contextlib.contextmanager
def serve_server(
    backend: GenerationBackend, tokenizer: Tokenizer, grace_s: float = 1.0, **settings: object
) -> Iterator[GatewayServer]:
    """The gateway's own server on a free port of 127.0.0.1, in a thread, as `diptych up` runs it."""
    app = build_app(backend, tokenizer, GatewaySettings(**settings))  # type: ignore[arg-type]
    server = GatewayServer(app, "127.0.0.1", 0, grace_s, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, timeout_s=10)
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(grace_s + 10)


@contextlib.contextmanager
def serve(backend: GenerationBackend, tokenizer: Tokenizer, **settings: Any) -> Iterator[str]:
    """serve_server's base URL."""
    with serve_server(backend, tokenizer, **settings) as server:
        yield server.url


def aborted_last(backend: ScriptedBackend) -> Callable[[], bool]:
    """Whether the backend's latest request has been aborted (checked when called)."""
    request_id = backend.requests[-1].request_id
    return lambda: request_id in backend.aborted


def wait_until(condition: Callable[[], bool], timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def backend(script: list[int]) -> ScriptedBackend:
    return ScriptedBackend(script)


@pytest.fixture(scope="module")
def url(backend: ScriptedBackend, tokenizer: Tokenizer) -> Iterator[str]:
    with serve(backend, tokenizer, served_model_names=(MODEL, "alias")) as base:
        yield base


@pytest.fixture()
def client(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=30) as c:
        yield c


def sse_payloads(lines: Iterator[str]) -> list[str]:
    return [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]


def stream_post(client: httpx.Client, path: str, body: dict[str, Any]) -> tuple[list[dict], str]:
    """Chunks of a streaming request, and the last payload (which must be [DONE])."""
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        payloads = sse_payloads(response.iter_lines())
    return [json.loads(p) for p in payloads[:-1]], payloads[-1]


def choice_text(choice: dict) -> str:
    """The text of a completion choice, a chat choice or a chat chunk's choice."""
    if "text" in choice:
        return choice["text"]
    return (choice.get("message") or choice["delta"]).get("content") or ""


def expected_text(tokenizer: Tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


# ---- chat and completions, streaming and not ----


def test_chat_nonstream_and_stream_agree(
    client: httpx.Client, tokenizer: Tokenizer, script: list[int], backend: ScriptedBackend
) -> None:
    prompt_len = len(tokenizer.apply_chat_template(CHAT, add_generation_prompt=True))
    full = client.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT}).json()
    assert full["object"] == "chat.completion" and full["model"] == MODEL
    choice = full["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected_text(tokenizer, script)}
    assert choice["finish_reason"] == "stop"
    assert full["usage"] == {
        "prompt_tokens": prompt_len,
        "completion_tokens": len(script),
        "total_tokens": prompt_len + len(script),
    }
    assert list(backend.requests[-1].prompt_token_ids) == tokenizer.apply_chat_template(
        CHAT, add_generation_prompt=True
    )
    assert backend.requests[-1].sampling.max_tokens == CONTEXT - prompt_len  # default: the context left

    body = {"messages": CHAT, "stream_options": {"include_usage": True}}
    chunks, last = stream_post(client, "/v1/chat/completions", body)
    assert last == "[DONE]"
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == choice["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks[-2:-1]] == ["stop"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]
    assert all(c["usage"] is None for c in chunks[:-1])


def test_completions_nonstream_and_stream_agree(
    client: httpx.Client, tokenizer: Tokenizer, script: list[int]
) -> None:
    prompt = "Tell me about Paris."
    body = {"model": "alias", "prompt": prompt, "max_tokens": 7, "temperature": 0}
    full = client.post("/v1/completions", json=body).json()
    assert full["object"] == "text_completion" and full["model"] == "alias"
    assert full["choices"][0]["text"] == expected_text(tokenizer, script[:7])
    assert full["choices"][0]["finish_reason"] == "length"
    prompt_len = len(tokenizer.encode(prompt))
    assert full["usage"] == {
        "prompt_tokens": prompt_len,
        "completion_tokens": 7,
        "total_tokens": prompt_len + 7,
    }

    chunks, last = stream_post(client, "/v1/completions", body)
    assert last == "[DONE]"
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in c for c in chunks)  # not asked for

    by_ids = client.post(
        "/v1/completions", json={"prompt": [tokenizer.encode(prompt)], "max_tokens": 7}
    ).json()
    assert by_ids["choices"][0]["text"] == full["choices"][0]["text"]
    assert by_ids["usage"] == full["usage"]


def test_sampling_fields_reach_the_backend(client: httpx.Client, backend: ScriptedBackend) -> None:
    body = {
        "prompt": "Hi",
        "max_tokens": 3,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": -1,
        "min_p": 0.05,
        "seed": 11,
        "stop": "never",
        "ignore_eos": True,
        "user": "someone",
    }
    assert client.post("/v1/completions", json=body).status_code == 200
    sampling = backend.requests[-1].sampling
    assert (sampling.max_tokens, sampling.temperature, sampling.top_p, sampling.top_k) == (3, 0.7, 0.9, 0)
    assert (sampling.min_p, sampling.seed, sampling.stop, sampling.ignore_eos) == (0.05, 11, ("never",), True)
    chat = {"messages": CHAT, "max_tokens": 50, "max_completion_tokens": 4}
    assert client.post("/v1/chat/completions", json=chat).json()["usage"]["completion_tokens"] == 4


def test_stop_string_cut_across_tokens_aborts_the_backend(
    client: httpx.Client, tokenizer: Tokenizer, script: list[int], backend: ScriptedBackend
) -> None:
    # A stop string made of the end of one token and the start of the next.
    pieces = [tokenizer.decode([t]) for t in script]
    k = next(
        i for i in range(3, len(pieces)) if len(pieces[i].strip()) >= 2 and len(pieces[i + 1].strip()) >= 2
    )
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    full_text = expected_text(tokenizer, script)
    reference = full_text[: full_text.index(stop)]
    tokens_needed = next(n for n in range(1, len(script) + 1) if stop in expected_text(tokenizer, script[:n]))

    for path, body in (
        ("/v1/completions", {"prompt": "Go", "stop": [stop, "zzzz"]}),
        ("/v1/chat/completions", {"messages": CHAT, "stop": stop}),
    ):
        full = client.post(path, json=body).json()
        choice = full["choices"][0]
        assert choice_text(choice) == reference
        assert choice["finish_reason"] == "stop"
        assert full["usage"]["completion_tokens"] == tokens_needed
        wait_until(aborted_last(backend))

        chunks, last = stream_post(client, path, body)
        assert "".join(choice_text(c["choices"][0]) for c in chunks) == reference and last == "[DONE]"
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        wait_until(aborted_last(backend))


def test_logprobs(client: httpx.Client, tokenizer: Tokenizer, script: list[int]) -> None:
    chat = client.post(
        "/v1/chat/completions", json={"messages": CHAT, "max_tokens": 6, "logprobs": True}
    ).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert [e["logprob"] for e in content] == [fake_logprob(t) for t in script[:6]]
    assert [e["token"] for e in content] == [tokenizer.decode([t]) for t in script[:6]]
    comp = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 6, "logprobs": 0}).json()
    logprobs = comp["choices"][0]["logprobs"]
    assert logprobs["token_logprobs"] == [fake_logprob(t) for t in script[:6]]
    assert logprobs["text_offset"][1] == len(logprobs["tokens"][0])
    assert (
        client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).json()["choices"][0]["logprobs"]
        is None
    )


def test_concurrent_requests_do_not_mix(
    client: httpx.Client, tokenizer: Tokenizer, script: list[int]
) -> None:
    def run(i: int) -> tuple[int, str]:
        body = {"prompt": f"request {i}", "max_tokens": 3 + i}
        if i % 2:
            chunks, _ = stream_post(client, "/v1/completions", body)
            return i, "".join(c["choices"][0]["text"] for c in chunks)
        return i, client.post("/v1/completions", json=body).json()["choices"][0]["text"]

    with ThreadPoolExecutor(8) as pool:
        results = dict(pool.map(run, range(8)))
    assert results == {i: expected_text(tokenizer, script[: 3 + i]) for i in range(8)}


def test_models_and_health(client: httpx.Client) -> None:
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["max_model_len"]) for m in models["data"]] == [(MODEL, CONTEXT), ("alias", CONTEXT)]
    assert client.get("/health").status_code == 200


# ---- errors ----

LONG = list(range(100, 100 + CONTEXT))

BAD_REQUESTS = [
    # (path, raw body or json, status, param, words the message must contain)
    ("/v1/chat/completions", b'{"messages": [', 400, None, "malformed JSON"),
    ("/v1/chat/completions", b"[1, 2]", 400, None, "JSON object"),
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages", "missing required field 'messages'"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt", "missing required field 'prompt'"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages", "messages[0].role"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages", "messages"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": "ten"}, 400, "max_tokens", "valid integer"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt", "string or a list of token ids"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream", "boolean"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", ">= 1"),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": -2}, 400, "max_tokens", ">= 1"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature", "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p", "top_p"),
    ("/v1/completions", {"prompt": "x", "top_k": -3}, 400, "top_k", "top_k"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop", "stop"),
    ("/v1/completions", {"prompt": "x", "stop": 3}, 400, "stop", "string or a list of strings"),
    ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n", "n=1"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt", "batch prompts not supported"),
    ("/v1/completions", {"prompt": []}, 400, "prompt", "empty"),
    ("/v1/completions", {"prompt": [1, 10**9]}, 400, "prompt", "token ids"),
    ("/v1/completions", {"prompt": LONG}, 400, "prompt", f"{CONTEXT} tokens, but the prompt has {CONTEXT}"),
    ("/v1/completions", {"prompt": LONG[:200], "max_tokens": 100}, 400, "max_tokens", "at most 56"),
    ("/v1/chat/completions", {"messages": CHAT, "model": "gpt-5"}, 404, "model", "gpt-5"),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 3}, 400, "top_logprobs", "only 0"),
    ("/v1/completions", {"prompt": "x", "logprobs": 5}, 400, "logprobs", "0 or 1"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages", "text parts"),
]  # fmt: skip


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client: httpx.Client) -> None:
    for path, body, status, param, words in BAD_REQUESTS:
        if isinstance(body, bytes):
            response = client.post(path, content=body, headers={"content-type": "application/json"})
        else:
            response = client.post(path, json=body)
        error = assert_openai_error(response, status)
        assert error["param"] == param, (body, error)
        assert words in error["message"], (body, error)
    assert (
        assert_openai_error(client.post("/v1/chat/completions", json={"messages": CHAT, "model": "x"}), 404)[
            "code"
        ]
        == "model_not_found"
    )
    assert_openai_error(client.get("/v1/nothing"), 404)
    assert_openai_error(client.get("/v1/completions"), 405)
    assert client.post("/v1/completions", json={"prompt": "still here", "max_tokens": 2}).status_code == 200


def test_hostile_bodies_get_400_in_the_openai_shape_without_a_traceback(
    url: str, client: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    nested = b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"  # ~10 KB, deeper than Python's recursion
    error = assert_openai_error(client.post("/v1/completions", content=nested), 400)
    assert "nested too deeply" in error["message"]
    lone_surrogate = b'{"prompt": "ab\\ud800cd", "max_tokens": 2}'
    error = assert_openai_error(client.post("/v1/completions", content=lone_surrogate), 400)
    assert "surrogate" in error["message"] and "\\ud800" in error["message"]
    chat = {"messages": [{"role": "user", "content": "\ud800"}]}
    assert_openai_error(client.post("/v1/chat/completions", content=json.dumps(chat)), 400)
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:  # httpx will not send this
        raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{}")
        reply = b""
        while chunk := raw.recv(4096):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head
    assert json.loads(body)["error"]["type"] == "invalid_request_error"
    assert not [r for r in caplog.records if r.exc_info], "a bad body must not log a traceback"
    assert client.post("/v1/completions", json={"prompt": "still here", "max_tokens": 2}).status_code == 200


def test_oversize_body_is_413_by_header_and_while_reading(tokenizer: Tokenizer, script: list[int]) -> None:
    backend = ScriptedBackend(script)
    with serve(backend, tokenizer, max_body_bytes=2000) as base, httpx.Client(base_url=base) as client:
        big = {"prompt": "x" * 5000}
        assert_openai_error(client.post("/v1/completions", json=big), 413)

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must hold while reading
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"y" * 500
            yield b'"}'

        assert_openai_error(client.post("/v1/completions", content=chunks()), 413)
        assert client.post("/v1/completions", json={"prompt": "small", "max_tokens": 1}).status_code == 200
    assert backend.requests[-1].prompt_token_ids == tuple(tokenizer.encode("small"))


def test_api_keys(tokenizer: Tokenizer, script: list[int]) -> None:
    body = {"prompt": "x", "max_tokens": 1}
    with (
        serve(ScriptedBackend(script), tokenizer, api_keys=("k1", "k2")) as base,
        httpx.Client(base_url=base) as c,
    ):
        assert assert_openai_error(c.post("/v1/completions", json=body), 401)["code"] == "invalid_api_key"
        bad = {"Authorization": "Bearer nope"}
        assert_openai_error(c.post("/v1/completions", json=body, headers=bad), 401)
        assert_openai_error(c.get("/v1/models", headers={"Authorization": "k1"}), 401)
        for key in ("k1", "k2"):
            assert (
                c.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}).status_code
                == 200
            )
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200
    with serve(ScriptedBackend(script), tokenizer) as base, httpx.Client(base_url=base) as c:
        assert c.post("/v1/completions", json=body).status_code == 200  # no keys configured: open


# ---- lifecycle: disconnect, overload, health, failures, timeout ----


def test_disconnect_aborts_the_backend_request(tokenizer: Tokenizer, script: list[int]) -> None:
    backend = ScriptedBackend(script, delay_s=0.05)
    with serve(backend, tokenizer) as base, httpx.Client(base_url=base, timeout=30) as client:
        with client.stream("POST", "/v1/completions", json={"prompt": "x", "stream": True}) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
        wait_until(aborted_last(backend), timeout_s=2)
        assert len(backend.aborted) == 1

        with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
            client.post("/v1/completions", json={"prompt": "x"}, timeout=0.3)
        wait_until(aborted_last(backend), timeout_s=2)
        assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_overload_is_429_with_retry_after(tokenizer: Tokenizer, script: list[int]) -> None:
    backend = ScriptedBackend(script, delay_s=0.1)
    with serve(backend, tokenizer, max_pending=2, retry_after_s=3) as base, httpx.Client(base_url=base) as c:
        body = {"prompt": "x", "stream": True}
        with (
            c.stream("POST", "/v1/completions", json=body) as first,
            c.stream("POST", "/v1/completions", json=body),
        ):
            assert first.status_code == 200
            busy = c.post("/v1/completions", json={"prompt": "x"})
            assert assert_openai_error(busy, 429)["type"] == "rate_limit_error"
            assert busy.headers["retry-after"] == "3"
        backend.delay_s = 0.001
        wait_until(lambda: len(backend.aborted) == 2)
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_unhealthy_backend_is_503(tokenizer: Tokenizer, script: list[int]) -> None:
    backend = ScriptedBackend(script, healthy=False)
    with serve(backend, tokenizer, retry_after_s=2) as base, httpx.Client(base_url=base) as client:
        assert_openai_error(client.get("/health"), 503)
        refused = client.post("/v1/completions", json={"prompt": "x"})
        assert_openai_error(refused, 503)
        assert refused.headers["retry-after"] == "2"
        assert backend.requests == []
        backend.healthy = True
        assert client.get("/health").status_code == 200
        backend.unavailable = True
        assert_openai_error(client.post("/v1/completions", json={"prompt": "x", "stream": True}), 503)


def test_backend_failure_mid_request(tokenizer: Tokenizer, script: list[int]) -> None:
    backend = ScriptedBackend(script, fail_after=3)
    with serve(backend, tokenizer) as base, httpx.Client(base_url=base) as client:
        error = assert_openai_error(client.post("/v1/completions", json={"prompt": "x"}), 500)
        assert "decode worker died" in str(error["message"])
        with client.stream("POST", "/v1/completions", json={"prompt": "x", "stream": True}) as response:
            assert response.status_code == 200
            payloads = sse_payloads(response.iter_lines())
        assert payloads[-1] == "[DONE]"
        assert "decode worker died" in json.loads(payloads[-2])["error"]["message"]
        texts = "".join(json.loads(p)["choices"][0]["text"] for p in payloads[:-2])
        assert texts == expected_text(tokenizer, script[:3])
        backend.fail_after = None
        assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_shutdown_past_its_grace_ends_each_request_with_an_error(
    tokenizer: Tokenizer, script: list[int]
) -> None:
    backend = ScriptedBackend(script * 20, delay_s=0.2)  # far longer than the grace period
    body = {"prompt": "x", "max_tokens": 200}
    with serve_server(backend, tokenizer, grace_s=0.5) as server, ThreadPoolExecutor(4) as pool:

        def stream() -> list[str]:
            with (
                httpx.Client(base_url=server.url, timeout=30) as c,
                c.stream("POST", "/v1/completions", json={**body, "stream": True}) as response,
            ):
                return sse_payloads(response.iter_lines())

        def whole() -> httpx.Response:
            with httpx.Client(base_url=server.url, timeout=30) as c:
                return c.post("/v1/completions", json=body)

        streams = [pool.submit(stream) for _ in range(3)]
        plain = pool.submit(whole)
        wait_until(lambda: len(backend.requests) == 4)
        time.sleep(0.5)  # every stream is under way
        server.should_exit = True  # what SIGTERM does
        for future in streams:
            payloads = future.result(timeout=10)
            assert payloads[-1] == "[DONE]"
            error = json.loads(payloads[-2])["error"]
            assert error["code"] == "shutdown" and "grace period" in error["message"]
            assert len(payloads) > 3  # it streamed before it was ended
        assert assert_openai_error(plain.result(timeout=10), 503)["code"] == "shutdown"
    wait_until(lambda: len(backend.aborted) == 4)  # and the backend was told to stop each one


def test_request_timeout_is_504_and_aborts(tokenizer: Tokenizer, script: list[int]) -> None:
    backend = ScriptedBackend(script, delay_s=0.1)
    with serve(backend, tokenizer, request_timeout_s=0.35) as base, httpx.Client(base_url=base) as client:
        assert (
            assert_openai_error(client.post("/v1/completions", json={"prompt": "x"}), 504)["code"]
            == "timeout"
        )
        wait_until(aborted_last(backend))


# ---- metrics ----


def scrape(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = client.get("/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_move(tokenizer: Tokenizer, script: list[int]) -> None:
    backend = ScriptedBackend(script)
    with serve(backend, tokenizer) as base, httpx.Client(base_url=base) as client:
        before = scrape(client)
        assert before[("diptych_time_to_first_token_seconds_count", ())] == 0
        for _ in range(3):
            assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 5}).status_code == 200
        stream_post(client, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 5})
        client.post("/v1/completions", json={"prompt": "x", "max_tokens": 0})
        after = scrape(client)
    assert after[("diptych_time_to_first_token_seconds_count", ())] == 4
    assert after[("diptych_e2e_request_latency_seconds_count", ())] == 4
    assert after[("diptych_time_per_output_token_seconds_count", ())] == 4 * (5 - 1)
    assert after[("diptych_queue_time_seconds_count", ())] == 4
    assert after[("diptych_kv_transfer_seconds_count", ())] == 4
    assert after[("diptych_kv_transfer_seconds_sum", ())] == pytest.approx(4 * 0.0015)
    assert after[("diptych_generation_tokens_total", ())] == 20
    requests = "diptych_requests_total"
    assert after[(requests, (("endpoint", "/v1/completions"), ("status", "200")))] == 3
    assert after[(requests, (("endpoint", "/v1/completions"), ("status", "400")))] == 1
    assert after[(requests, (("endpoint", "/v1/chat/completions"), ("status", "200")))] == 1
    assert after[("diptych_gateway_requests_in_flight", ())] == 0
    for report in backend.load():
        labels = (("role", report.role), ("worker", report.worker_id))
        assert after[("diptych_worker_kv_blocks_used", labels)] == report.used_blocks
        assert after[("diptych_worker_running_requests", labels)] == report.running
        assert after[("diptych_worker_waiting_requests", labels)] == report.waiting
        assert after[("diptych_worker_held_requests", labels)] == report.held
        assert after[("diptych_worker_served_requests_total", labels)] == report.served
        assert after[("diptych_worker_kv_transfer_mean_seconds", labels)] == report.kv_transfer_s_mean


# ---- the official openai client against a real server ----


def test_official_openai_client(tokenizer: Tokenizer, script: list[int]) -> None:
    with serve(ScriptedBackend(script), tokenizer, api_keys=("secret",)) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="secret", max_retries=0)
        assert [m.id for m in client.models.list()] == [MODEL]
        messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": CHAT[0]["content"]}]

        chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
        assert chat.choices[0].message.content == expected_text(tokenizer, script[:8])
        assert chat.choices[0].finish_reason == "length" and chat.usage is not None
        assert chat.usage.completion_tokens == 8
        stream = client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert (
            "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            == chat.choices[0].message.content
        )
        assert chunks[-1].usage == chat.usage

        comp = client.completions.create(model=MODEL, prompt="Paris is", max_tokens=5)
        assert comp.choices[0].text == expected_text(tokenizer, script[:5])
        assert comp.usage is not None and comp.usage.prompt_tokens == len(tokenizer.encode("Paris is"))
        pieces = [
            c.choices[0].text
            for c in client.completions.create(model=MODEL, prompt="Paris is", max_tokens=5, stream=True)
        ]
        assert "".join(pieces) == comp.choices[0].text

        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="nope", prompt="x")
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            client.completions.create(model=MODEL, prompt="x", max_tokens=0)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()


# ---- routing policy ----


def report(worker: str, running: int, waiting: int, used: int, total: int = 100) -> LoadReport:
    return LoadReport(worker, "decode", running, waiting, used, total)


def test_least_loaded_policy() -> None:
    request = GenerateRequest("r", (1, 2), SamplingParams())
    policy = make_policy("least_loaded")
    assert isinstance(policy, LeastLoaded)
    prefill = [report("p1", 2, 0, 0), report("p0", 1, 1, 0), report("p2", 0, 1, 50)]
    decode = [report("d0", 3, 0, 10), report("d1", 1, 2, 90), report("d2", 2, 1, 40, total=200)]
    # p2 has the fewest requests; among the decodes (all 3), d2 has the most free blocks.
    assert policy.choose(prefill, decode, request) == ("p2", "d2")
    # Equal load and free blocks: the smallest id wins, whatever the order of the reports.
    tied = [report("w3", 1, 0, 5), report("w1", 0, 1, 5), report("w2", 1, 0, 5)]
    assert policy.choose(tied, list(reversed(tied)), request) == ("w1", "w1")
    with pytest.raises(NoWorkerError, match="decode"):
        policy.choose(prefill, [], request)
    with pytest.raises(ValueError, match="least_loaded"):
        make_policy("random")


def test_openapi_describes_what_the_post_endpoints_take_and_return(client: httpx.Client) -> None:
    doc = client.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]

    def resolve(schema: dict[str, Any]) -> dict[str, Any]:
        return schemas[schema["$ref"].rsplit("/", 1)[1]]

    expected = {
        "/v1/chat/completions": ("messages", "chat.completion", "chat.completion.chunk"),
        "/v1/completions": ("prompt", "text_completion", "text_completion"),
    }
    for path, (required, kind, chunk_kind) in expected.items():
        post = doc["paths"][path]["post"]
        body = resolve(post["requestBody"]["content"]["application/json"]["schema"])
        assert required in body["required"] and "max_tokens" in body["properties"]
        ok = post["responses"]["200"]["content"]
        assert resolve(ok["application/json"]["schema"])["properties"]["object"]["const"] == kind
        assert resolve(ok["text/event-stream"]["schema"])["properties"]["object"]["const"] == chunk_kind
        for status in ("400", "401", "404", "413", "429", "503", "504"):
            error = resolve(post["responses"][status]["content"]["application/json"]["schema"])
            assert error["required"] == ["error"], status
