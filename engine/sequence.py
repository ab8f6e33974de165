"""A request's mutable state inside one worker. Pure Python."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from diptych.engine.messages import FinishReason, SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # an entity: compared by identity, never by its token lists (O(B^2) per step)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    seed: int  # the request's seed, or one drawn for it: sampling is a pure function of (seed, step)
    arrival_time: float = 0.0
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    # Tokens sampled by steps still running on the device (async scheduling): counted in num_tokens, so the
    # next step can be scheduled, but their values are not known here until the step resolves.
    num_pending_tokens: int = 0
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    first_scheduled_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending_tokens

    @property
    def num_output_tokens(self) -> int:
        """Sampled so far, the pending ones included."""
        return len(self.output_token_ids) + self.num_pending_tokens

    @property
    def all_token_ids(self) -> list[int]:
        """The known tokens (pending ones excluded)."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def token_at(self, position: int) -> int:
        """A known token (not a pending one)."""
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < n else self.output_token_ids[position - n]
