"""From a validated OpenAI body to the backend's `GenerateRequest`: template, tokenize, check lengths.

Context rule (vLLM's): a prompt must leave room for at least one token; an explicit `max_tokens` that
does not fit in the context left is a 400, never silently clamped; without one, generation may use
all of the context left.
"""

from __future__ import annotations

import dataclasses
import time

from diptych.engine.messages import GenerateRequest, SamplingParams, SamplingParamsError
from diptych.engine.tokenizer import Tokenizer
from diptych.router.errors import bad_request
from diptych.router.protocol import ChatCompletionRequest, CompletionRequest

_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


def chat_prompt(tokenizer: Tokenizer, body: ChatCompletionRequest) -> list[int]:
    messages = [{"role": m.role, "content": m.text} for m in body.messages]
    try:
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    except Exception as e:  # a template may reject any shape of conversation it was not written for
        raise bad_request(f"the chat template rejected the messages: {e}", param="messages") from e


def completion_prompt(tokenizer: Tokenizer, body: CompletionRequest) -> list[int]:
    if isinstance(body.prompt, str):
        return list(tokenizer.encode(body.prompt))
    vocab = tokenizer.vocab_size
    bad = [t for t in body.prompt if not 0 <= t < vocab]
    if bad:
        raise bad_request(f"prompt token ids must be in [0, {vocab}); got {bad[0]}", param="prompt")
    return list(body.prompt)


def build_request(
    request_id: str,
    prompt: list[int],
    body: ChatCompletionRequest | CompletionRequest,
    max_model_len: int,
    timeout_s: float | None = None,
) -> GenerateRequest:
    if not prompt:
        raise bad_request("the prompt is empty", param="prompt")
    room = max_model_len - len(prompt)
    if room < 1:
        raise bad_request(
            f"this model's maximum context length is {max_model_len} tokens, but the prompt has "
            f"{len(prompt)} tokens (at least one token must be left to generate)",
            param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
        )
    max_tokens = body.requested_max_tokens
    if max_tokens is not None and max_tokens > room:
        raise bad_request(
            f"this model's maximum context length is {max_model_len} tokens; the prompt has {len(prompt)} "
            f"tokens and max_tokens is {max_tokens}, so at most {room} tokens can be generated",
            param="max_tokens",
        )
    sampling = _sampling(body, room if max_tokens is None else max_tokens)
    now = time.time()
    deadline = None if timeout_s is None else now + timeout_s
    return GenerateRequest(request_id, tuple(prompt), sampling, arrival_time=now, deadline_time=deadline)


def _sampling(body: ChatCompletionRequest | CompletionRequest, max_tokens: int) -> SamplingParams:
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=0 if body.top_k == -1 else body.top_k,
            min_p=body.min_p,
            seed=body.seed,
            stop=body.stop_strings,
            stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=body.ignore_eos,
            logprobs=body.wants_logprobs,
        )
    except SamplingParamsError as e:
        name = str(e).split(" ", 1)[0]  # SamplingParams' messages start with the parameter's name
        raise bad_request(str(e), param=name if name in _SAMPLING_FIELDS else None) from e
