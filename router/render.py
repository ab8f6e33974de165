"""Turn `TextDelta`s into OpenAI bodies: one renderer per endpoint, the same calls for both."""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel

from diptych.engine.tokenizer import Tokenizer
from diptych.router.lifecycle import TextDelta, Usage
from diptych.router.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    TokenLogprob,
    UsageInfo,
)


def usage_info(usage: Usage) -> UsageInfo:
    return UsageInfo(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )


@dataclass(frozen=True)
class Renderer(ABC):
    request_id: str
    model: str
    created: int
    tokenizer: Tokenizer
    logprobs: bool  # the client asked for them

    @abstractmethod
    def opening_chunks(self) -> list[BaseModel]:
        """Chunks sent before any text (chat announces the assistant role)."""

    @abstractmethod
    def chunk(self, delta: TextDelta) -> BaseModel:
        """The stream chunk for one delta (`usage` left unset)."""

    @abstractmethod
    def usage_chunk(self, usage: Usage) -> BaseModel:
        """The last chunk when the client asked for usage: no choices, just the counts."""

    @abstractmethod
    def response(self, deltas: Sequence[TextDelta]) -> BaseModel:
        """The whole non-streaming response from every delta, the last one finished."""

    def _token_strings(self, token_ids: Sequence[int]) -> list[str]:
        return [self.tokenizer.decode([t]) for t in token_ids]


def _logprob_pairs(deltas: Sequence[TextDelta]) -> tuple[list[int], list[float]] | None:
    """Token ids with their logprobs, or None when the backend sent none."""
    if any(d.logprobs is None and d.token_ids for d in deltas):
        return None
    ids = [t for d in deltas for t in d.token_ids]
    values = [lp for d in deltas for lp in (d.logprobs or ())]
    return ids, values


class ChatRenderer(Renderer):
    def opening_chunks(self) -> list[BaseModel]:
        return [self._chunk(ChatChunkChoice(delta=ChatDelta(role="assistant", content="")))]

    def chunk(self, delta: TextDelta) -> BaseModel:
        content = delta.text if delta.text or delta.finish_reason is None else None
        choice = ChatChunkChoice(
            delta=ChatDelta(content=content),
            logprobs=self._logprobs([delta]),
            finish_reason=delta.finish_reason,
        )
        return self._chunk(choice)

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return ChatCompletionChunk(
            id=self.request_id, created=self.created, model=self.model, choices=[], usage=usage_info(usage)
        )

    def response(self, deltas: Sequence[TextDelta]) -> BaseModel:
        last = deltas[-1]
        assert last.finish_reason is not None and last.usage is not None
        choice = ChatChoice(
            message=AssistantMessage(content="".join(d.text for d in deltas)),
            logprobs=self._logprobs(deltas),
            finish_reason=last.finish_reason,
        )
        return ChatCompletionResponse(
            id=self.request_id,
            created=self.created,
            model=self.model,
            choices=[choice],
            usage=usage_info(last.usage),
        )

    def _chunk(self, choice: ChatChunkChoice) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.request_id, created=self.created, model=self.model, choices=[choice]
        )

    def _logprobs(self, deltas: Sequence[TextDelta]) -> ChatLogprobs | None:
        pairs = _logprob_pairs(deltas) if self.logprobs else None
        if pairs is None:
            return None
        ids, values = pairs
        entries = [
            TokenLogprob(token=text, logprob=lp, bytes=list(text.encode()))
            for text, lp in zip(self._token_strings(ids), values, strict=True)
        ]
        return ChatLogprobs(content=entries)


class CompletionRenderer(Renderer):
    def opening_chunks(self) -> list[BaseModel]:
        return []

    def chunk(self, delta: TextDelta) -> BaseModel:
        choice = CompletionChoice(
            text=delta.text, logprobs=self._logprobs([delta]), finish_reason=delta.finish_reason
        )
        return CompletionResponse(
            id=self.request_id, created=self.created, model=self.model, choices=[choice]
        )

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return CompletionResponse(
            id=self.request_id, created=self.created, model=self.model, choices=[], usage=usage_info(usage)
        )

    def response(self, deltas: Sequence[TextDelta]) -> BaseModel:
        last = deltas[-1]
        assert last.finish_reason is not None and last.usage is not None
        choice = CompletionChoice(
            text="".join(d.text for d in deltas),
            logprobs=self._logprobs(deltas),
            finish_reason=last.finish_reason,
        )
        return CompletionResponse(
            id=self.request_id,
            created=self.created,
            model=self.model,
            choices=[choice],
            usage=usage_info(last.usage),
        )

    def _logprobs(self, deltas: Sequence[TextDelta]) -> CompletionLogprobs | None:
        pairs = _logprob_pairs(deltas) if self.logprobs else None
        if pairs is None:
            return None
        ids, values = pairs
        tokens = self._token_strings(ids)
        offsets = [0, *itertools.accumulate(len(t) for t in tokens)][: len(tokens)]
        return CompletionLogprobs(tokens=tokens, token_logprobs=values, text_offset=offsets)
